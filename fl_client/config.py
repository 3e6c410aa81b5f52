"""Job and bank configuration: Flower run config / node config -> frozen dataclasses.

Config flows one way (STYLE 2): kebab-case keys in pyproject `[tool.flwr.app.config]` (the job,
identical for every party) and in each SuperNode's `--node-config` (the bank), turned into typed
dataclasses here, validated once at entry. Code below takes typed fields, never string keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.keys import SECRET_FILE
from protocol.config import JobConfig
from protocol.errors import ConfigError


@dataclass(frozen=True)
class BankConfig:
    """One bank's deployment: from its SuperNode's node-config."""

    bank_id: str
    state_dir: Path
    key_path: Path  # the bank's secret CKKS context (never leaves the bank)
    data_path: Path | None = None  # own JSONL/CSV/Parquet; None = synthetic slice
    partition_id: int = 0
    epsilon: float = 8.0
    delta: float = 1e-5
    planned_rounds: int = 0  # rounds the bank calibrates its noise for; 0 = the job's num-rounds
    torch_threads: int = 0  # intra-op threads for this bank's ClientApps; 0 = torch's default

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], job: JobConfig) -> BankConfig:
        """Reads `bank-id`, `partition-id`, `data-path`, `key-path`, `state-dir`, `epsilon`, `delta`.

        Simulation gives only `partition-id`; everything else then defaults from the job.
        """
        raw = dict(node_config)
        try:
            partition = int(raw.get("partition-id", 0))
        except (TypeError, ValueError):
            raise ConfigError(
                f"node config: 'partition-id' expected an integer, got {raw.get('partition-id')!r}"
            ) from None
        bank_id = str(raw.get("bank-id") or f"bank-{partition}")
        data_path = raw.get("data-path") or None
        try:
            epsilon = float(raw.get("epsilon", job.epsilon))
            delta = float(raw.get("delta", job.delta))
            planned_rounds = int(raw.get("planned-rounds", 0))
            torch_threads = int(raw.get("torch-threads", 0))
            if "torch-threads" not in raw and "num-partitions" in raw:  # simulation: banks share the host
                torch_threads = max(1, (os.cpu_count() or 1) // max(1, int(raw["num-partitions"])))
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"node config of {bank_id}: epsilon/delta/planned-rounds must be numbers ({err})"
            ) from None
        if epsilon <= 0:
            raise ConfigError(f"node config of {bank_id}: 'epsilon' expected > 0, got {epsilon}")
        if not 0 < delta < 1:
            raise ConfigError(f"node config of {bank_id}: 'delta' expected in (0, 1), got {delta}")
        if planned_rounds < 0 or torch_threads < 0:
            raise ConfigError(
                f"node config of {bank_id}: 'planned-rounds'/'torch-threads' expected >= 0, "
                f"got {planned_rounds}/{torch_threads}"
            )
        return cls(
            bank_id=bank_id,
            state_dir=Path(raw.get("state-dir") or Path(job.bank_state_root) / job.job_id / bank_id),
            key_path=Path(raw.get("key-path") or Path(job.key_dir) / SECRET_FILE),
            data_path=Path(data_path) if data_path else None,
            partition_id=partition,
            epsilon=epsilon,
            delta=delta,
            planned_rounds=planned_rounds,
            torch_threads=torch_threads,
        )
