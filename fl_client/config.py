"""Job and bank configuration: Flower run config / node config -> frozen dataclasses.

Config flows one way (STYLE 2): kebab-case keys in pyproject `[tool.flwr.app.config]` (the job,
identical for every party) and in each SuperNode's `--node-config` (the bank), turned into typed
dataclasses here, validated once at entry. Code below takes typed fields, never string keys.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from crypto.keys import SECRET_FILE
from fl_client.errors import ConfigError


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce(cls_name: str, key: str, value: Any, default: Any) -> Any:
    """Casts a TOML/CLI value to the type of the field's default, naming the key on failure."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{cls_name}: '{key}' expected true/false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{cls_name}: '{key}' expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{cls_name}: '{key}' expected an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{cls_name}: '{key}' expected a number, got {value!r}") from None
    return str(value)


def from_mapping(cls: type, raw: Mapping[str, Any], *, source: str, strict: bool = False) -> Any:
    """Builds dataclass `cls` from kebab-case keys; unknown keys are errors when `strict`."""
    known = {_kebab(f.name): f for f in fields(cls)}
    if strict:
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for key, f in known.items():
        if key in raw:
            default = f.default if f.default is not dataclasses.MISSING else None
            kwargs[f.name] = _coerce(source, key, raw[key], default) if default is not None else raw[key]
    return cls(**kwargs)


@dataclass(frozen=True)
class JobConfig:
    """One federated fine-tuning job: identical at the server and every bank."""

    job_id: str = "demo"
    num_rounds: int = 3
    seed: int = 0
    # model
    model_preset: str = "small"
    base_checkpoint: str = ""  # HF-format folder on local disk; empty = preset with seeded init
    train_mode: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seq_len: int = 128
    # local training per round
    local_steps: int = 20
    batch_size: int = 16  # expected (Poisson) batch size under DP
    lr: float = 0.01
    # data (synthetic corpus when a bank has no data-path)
    synthetic_banks: int = 3
    records_per_bank: int = 2000
    eval_fraction: float = 0.1
    # privacy
    dp: bool = True
    epsilon: float = 8.0  # default budget per bank (a bank's node-config may lower it)
    delta: float = 1e-5
    clip_norm: float = 1.0
    privacy_unit: str = "record"
    accountant: str = "prv"
    grad_sample_mode: str = "mixed"
    secure_mode: bool = False  # production: OS CSPRNG for sampling and noise, no seeds
    # federation
    min_banks: int = 2
    round_timeout: float = 900.0
    keep_plaintext_deltas: bool = False  # debug/test only: banks keep their deltas on disk
    evaluate: bool = True
    # paths (server and simulated banks resolve them relative to the working directory)
    key_dir: str = "runs/keys"
    server_state_dir: str = "runs/server"
    bank_state_root: str = "runs/banks"

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError(f"run config: 'num-rounds' expected >= 1, got {self.num_rounds}")
        if self.min_banks < 1:
            raise ConfigError(f"run config: 'min-banks' expected >= 1, got {self.min_banks}")
        if not self.job_id or "/" in self.job_id:
            raise ConfigError(f"run config: 'job-id' expected a non-empty name without '/', got {self.job_id!r}")
        if self.privacy_unit not in ("record", "customer"):
            raise ConfigError(f"run config: 'privacy-unit' expected 'record' or 'customer', got {self.privacy_unit!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"run config: 'delta' expected in (0, 1), got {self.delta}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> JobConfig:
        return from_mapping(cls, run_config, source="run config")

    def to_run_config(self) -> dict[str, Any]:
        return {_kebab(f.name): getattr(self, f.name) for f in fields(self)}


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
