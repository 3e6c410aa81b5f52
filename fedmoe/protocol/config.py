"""The job config: Flower run config -> a frozen dataclass, identical at the server and every bank.

Config flows one way (STYLE 2): kebab-case keys in pyproject `[tool.flwr.app.config]` (the job,
identical for every party) are turned into typed dataclasses here, validated once at entry. Code
below takes typed fields, never string keys. A bank's own settings (node-config, privacy policy)
live in fedmoe.fl_client.config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedmoe.protocol.errors import ConfigError

PRIVACY_UNITS: tuple[str, ...] = ("record", "customer")
AGGREGATIONS: tuple[str, ...] = ("secagg", "ckks")
# How a bank holds the frozen base while it trains (fedmoe.model.quant): fp32, or int8 weights with
# per-channel scales (LoRA factors and everything trainable stay fp32; exports use the fp32 base).
BASE_PRECISIONS: tuple[str, ...] = ("fp32", "int8")
# What every bank applies to the decrypted mean update (fedmoe.fl_client.fedopt).
UPDATE_RULES: tuple[str, ...] = ("adam", "sgdm", "mean")

# Secure aggregation's files in a key folder (the job's key-dir; a bank's: the folder of its key-path).
PINS_FILE = "pins.json"  # the consortium's pinned Ed25519 identity keys (public)


def identity_file_name(bank_id: str) -> str:
    """A bank's Ed25519 identity key file (mode 0600; only in that bank's key folder)."""
    return f"{bank_id}.identity.secret"


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


# The non-root user every fedmoe container runs as (deploy/Dockerfile): kits hand it their files, and a
# bank's site check reads their modes for it.
CONTAINER_UID = 10001

# Run-config keys a resubmission of the same job may change: how long the server waits, never what
# banks train or what their privacy is. The server's state and each bank's record of its job agree on it.
RESUBMIT_MAY_CHANGE = frozenset({"num-rounds", "round-timeout", "rejoin-grace"})


@dataclass(frozen=True)
class JobConfig:
    """One federated fine-tuning job: identical at the server and every bank."""

    job_id: str = "demo"
    num_rounds: int = 3
    seed: int = 0
    # model
    model_preset: str = "small"
    base_checkpoint: str = ""  # HF-format folder on local disk; empty = preset with seeded init
    base_checkpoint_sha256: str = ""  # content pin every bank checks its copy against ("" = no pin)
    train_mode: str = "lora"
    base_precision: str = "fp32"  # fp32 | int8: the frozen base while training (memory only; layout unchanged)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seq_len: int = 128
    # the round (fedmoe.fl_client.fedopt): each bank runs local-steps DP-SGD steps of plain SGD at
    # local-lr and releases its clamped update; every bank applies update-rule to the decrypted mean
    update_rule: str = "adam"  # adam | sgdm (momentum beta1) | mean (local AdamW at lr, the mean as is)
    local_steps: int = 1
    local_lr: float = 1.0
    lr: float = 0.01  # of update-rule on the mean (mean: of the local AdamW)
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    batch_size: int = 16  # expected (Poisson) batch size under DP; the accountant calibrates sigma for it
    physical_batch_size: int = 0  # most samples per forward/backward (memory); 0 = batch-size
    # data (synthetic corpus when a bank has no data-path)
    synthetic_banks: int = 3
    records_per_bank: int = 2000
    eval_fraction: float = 0.1
    # privacy
    dp: bool = True
    epsilon: float = 8.0  # what the job asks each bank to allow; a bank refuses more than its policy
    delta: float = 1e-5  # asked of each bank; a bank refuses more than its policy's max-delta
    clip_norm: float = 1.0
    privacy_unit: str = "record"
    accountant: str = "prv"
    grad_sample_mode: str = "mixed"
    secure_mode: bool = True  # OS CSPRNG for sampling and noise; false = seeded, only if the bank policy allows
    # federation
    # secagg: pairwise + self masks, then BFV (the server plus one bank cannot read another bank's
    # update); ckks: one shared CKKS key (one institution federating its own silos)
    aggregation: str = "secagg"
    # secagg: each bank's masking neighbours. 0 = everyone neighbours everyone (the default); an even k =
    # a k-regular graph (Bell et al. 2020): key shares grow as n k instead of n^2, the guarantees hold per
    # neighbourhood of k + 1 banks, and every round runs the consent exchange (docs/secagg.md).
    secagg_neighbours: int = 0
    min_banks: int = 3
    max_banks: int = 64  # banks reject an aggregate whose total weight says more contributed
    round_timeout: float = 900.0
    # Before a round, how long the server waits for a bank of this job that is not connected (a
    # restarted SuperNode) before starting the round without it; once per absence, not every round.
    rejoin_grace: float = 60.0
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
        if self.max_banks < self.min_banks:
            raise ConfigError(f"run config: 'max-banks' expected >= min-banks {self.min_banks}, got {self.max_banks}")
        if self.secagg_neighbours < 0 or self.secagg_neighbours % 2:
            raise ConfigError(
                "run config: 'secagg-neighbours' expected 0 (everyone neighbours everyone) or an even number "
                f">= 2, got {self.secagg_neighbours}"
            )
        if self.rejoin_grace < 0:
            raise ConfigError(f"run config: 'rejoin-grace' expected >= 0 seconds, got {self.rejoin_grace}")
        if not self.job_id or "/" in self.job_id:
            raise ConfigError(f"run config: 'job-id' expected a non-empty name without '/', got {self.job_id!r}")
        if self.privacy_unit not in PRIVACY_UNITS:
            units = " or ".join(map(repr, PRIVACY_UNITS))
            raise ConfigError(f"run config: 'privacy-unit' expected {units}, got {self.privacy_unit!r}")
        if self.aggregation not in AGGREGATIONS:
            names = " or ".join(map(repr, AGGREGATIONS))
            raise ConfigError(f"run config: 'aggregation' expected {names}, got {self.aggregation!r}")
        if self.base_precision not in BASE_PRECISIONS:
            names = " or ".join(map(repr, BASE_PRECISIONS))
            raise ConfigError(f"run config: 'base-precision' expected {names}, got {self.base_precision!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"run config: 'delta' expected in (0, 1), got {self.delta}")
        self._check_round()

    def _check_round(self) -> None:
        if self.update_rule not in UPDATE_RULES:
            rules = list(UPDATE_RULES)
            raise ConfigError(f"run config: 'update-rule' expected one of {rules}, got {self.update_rule!r}")
        for key, value, ok, expected in (
            ("local-steps", self.local_steps, self.local_steps >= 1, ">= 1"),
            ("batch-size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("physical-batch-size", self.physical_batch_size, self.physical_batch_size >= 0, ">= 0 (0 = batch-size)"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("local-lr", self.local_lr, self.local_lr > 0, "> 0"),
            ("beta1", self.beta1, 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", self.beta2, 0 <= self.beta2 < 1, "in [0, 1)"),
            ("adam-eps", self.adam_eps, self.adam_eps > 0, "> 0"),
        ):
            if not ok:
                raise ConfigError(f"run config: '{key}' expected {expected}, got {value}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> JobConfig:
        return from_mapping(cls, run_config, source="run config")

    def to_run_config(self) -> dict[str, Any]:
        return {_kebab(f.name): getattr(self, f.name) for f in fields(self)}
