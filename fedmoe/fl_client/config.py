"""A bank's own configuration: its SuperNode's node-config (and the privacy policy it points to).

The job's config (identical for every party) is fedmoe.protocol.config.JobConfig; what is in here is
the bank's alone and never comes from the server. Node-config keys are kebab-case; unknown keys
are errors naming the closest known key, so a typo (`epsilom`, `data_path`) never passes
silently.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmoe.crypto.keys import SECRET_FILE
from fedmoe.fl_client.policy import BankPolicy
from fedmoe.protocol.config import JobConfig, _coerce, identity_file_name
from fedmoe.protocol.errors import ConfigError

__all__ = ["BankConfig", "JobConfig", "NODE_CONFIG_KEYS"]

# Ours, with the type each must have; plus the keys Flower's simulation engine sets itself.
NODE_CONFIG_KEYS: dict[str, type] = {
    "bank-id": str,
    "partition-id": int,
    "data-path": str,
    "key-path": str,
    "state-dir": str,
    "policy-file": str,
    "identity-key": str,
    "epsilon": float,
    "delta": float,
    "planned-rounds": int,
    "torch-threads": int,
}
FLOWER_NODE_CONFIG_KEYS = ("num-partitions",)


def parse_node_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Typed node-config values; unknown keys are errors naming the closest known one."""
    bank_id = str(raw.get("bank-id") or f"bank-{raw.get('partition-id', 0)}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in FLOWER_NODE_CONFIG_KEYS:
            continue
        if key not in NODE_CONFIG_KEYS:
            close = difflib.get_close_matches(key, [*NODE_CONFIG_KEYS, *FLOWER_NODE_CONFIG_KEYS], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"node config of {bank_id}: unknown key {key!r}{hint} (known: {sorted(NODE_CONFIG_KEYS)})"
            )
        # the run config's coercion, with the type's zero as the default: int, float or str
        out[key] = _coerce(f"node config of {bank_id}", key, value, NODE_CONFIG_KEYS[key]())
    return out


@dataclass(frozen=True)
class BankConfig:
    """One bank's deployment: from its SuperNode's node-config.

    `state_root` holds everything the bank keeps, for every job: `jobs/<job-id>/` (replica,
    state) and `privacy/<dataset fingerprint>/` (ledger and accountant, shared across jobs so a
    new job on the same data continues from the epsilon already spent).
    """

    bank_id: str
    state_root: Path
    key_path: Path  # the bank's secret CKKS context (never leaves the bank)
    data_path: Path | None = None  # own JSONL/CSV/Parquet; None = synthetic slice
    partition_id: int = 0
    policy: BankPolicy = field(default_factory=BankPolicy)
    planned_rounds: int = 0  # rounds the bank calibrates its noise for; 0 = the job's num-rounds
    torch_threads: int = 0  # intra-op threads for this bank's ClientApps; 0 = torch's default
    identity_key: Path | None = None  # node-config `identity-key` (provisioned); None = in the state root

    @property
    def identity_path(self) -> Path:
        """The bank's Ed25519 identity: it signs the bank's ledger entries and secure-aggregation messages.

        Node-config `identity-key`; else the key ceremony's `<key folder>/<bank>.identity.secret`;
        else `<state-root>/identity.secret` (created on first use, see fedmoe.fl_client.privacy).
        """
        if self.identity_key is not None:
            return self.identity_key
        provisioned = self.key_path.parent / identity_file_name(self.bank_id)
        return provisioned if provisioned.exists() else self.state_root / "identity.secret"

    def job_dir(self, job_id: str) -> Path:
        return self.state_root / "jobs" / job_id

    def privacy_dir(self, fingerprint: str) -> Path:
        return self.state_root / "privacy" / fingerprint[:24]

    @property
    def lock_file(self) -> Path:
        return self.state_root / ".round.lock"

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], job: JobConfig) -> BankConfig:
        """Reads the node-config; simulation gives only `partition-id`, the rest defaults from the job."""
        raw = parse_node_config(node_config)
        partition = raw.get("partition-id", 0)
        bank_id = raw.get("bank-id") or f"bank-{partition}"
        torch_threads = raw.get("torch-threads", 0)
        if "torch-threads" not in raw and "num-partitions" in node_config:  # simulation: banks share the host
            torch_threads = max(1, (os.cpu_count() or 1) // max(1, int(node_config["num-partitions"])))
        planned_rounds = raw.get("planned-rounds", 0)
        if planned_rounds < 0 or torch_threads < 0:
            raise ConfigError(
                f"node config of {bank_id}: 'planned-rounds'/'torch-threads' expected >= 0, "
                f"got {planned_rounds}/{torch_threads}"
            )
        return cls(
            bank_id=bank_id,
            state_root=Path(raw.get("state-dir") or Path(job.bank_state_root) / bank_id),
            key_path=Path(raw.get("key-path") or Path(job.key_dir) / SECRET_FILE),
            data_path=Path(raw["data-path"]) if raw.get("data-path") else None,
            partition_id=partition,
            policy=_policy(raw, bank_id),
            planned_rounds=planned_rounds,
            torch_threads=torch_threads,
            identity_key=Path(raw["identity-key"]) if raw.get("identity-key") else None,
        )


def _policy(raw: Mapping[str, Any], bank_id: str) -> BankPolicy:
    """The policy file's rules; node-config `epsilon`/`delta` (the bank's own) may only tighten them."""
    node = {k: raw[k] for k in ("epsilon", "delta") if raw.get(k) is not None}
    if raw.get("policy-file"):
        return BankPolicy.from_file(raw["policy-file"]).tightened(**node)
    return BankPolicy.from_mapping({}, source=f"defaults of {bank_id}").tightened(**node)
