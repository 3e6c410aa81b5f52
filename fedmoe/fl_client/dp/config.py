"""A bank's differential-privacy settings: one frozen dataclass, validated at construction.

The budget (target_epsilon, delta) and the privacy unit are the bank's own decisions (node
config); the training shape (rounds, steps, batch, clip, lr) may come from the job's run config.
The Flower layer builds one `DPConfig` from both at entry.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from fedmoe.fl_client.dp.errors import DPError
from fedmoe.protocol.config import PRIVACY_UNITS

AccountantName = Literal["prv", "rdp"]
GradSampleMode = Literal["hooks", "ghost", "mixed"]
PrivacyUnit = Literal["record", "customer"]
OptimizerName = Literal["sgd", "adamw"]

ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "ghost", "mixed")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings of one bank for a federated job.

    Attributes:
        target_epsilon, delta: the bank's total budget over every round it takes part in.
        clip_norm: C, the per-sample (per privacy unit) gradient L2 bound.
        planned_rounds: rounds the noise is calibrated for; a bank refuses any round past its budget.
        local_steps: DP-SGD steps (Poisson batches) per round.
        expected_batch_size: q * n; the logical batch and the averaging denominator.
        physical_batch_size: most samples per forward/backward (memory), any logical batch size.
        accountant: "prv" (default, tight) or "rdp".
        grad_sample_mode: "hooks" (instantiate every per-sample gradient), "ghost" (ghost norms
            for linears and expert banks, two backward passes), or "mixed" (per layer, whichever
            is cheaper; default).
        privacy_unit: "record" (one record per sample) or "customer" (one customer per sample).
        secure_mode: OS CSPRNG for sampling and noise, plus the 2n-Gaussian floating-point fix;
            for production; forbids a seed.
        optimizer, lr, weight_decay, momentum: the update rule applied to the noised gradient.
        bank_id: the bank's name, used in messages and reports.
    """

    target_epsilon: float
    delta: float
    clip_norm: float = 1.0
    planned_rounds: int = 3
    local_steps: int = 20
    expected_batch_size: int = 16
    physical_batch_size: int = 16
    accountant: AccountantName = "prv"
    grad_sample_mode: GradSampleMode = "mixed"
    privacy_unit: PrivacyUnit = "record"
    secure_mode: bool = False
    optimizer: OptimizerName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    bank_id: str = "bank"

    def __post_init__(self) -> None:
        def need(cond: bool, field: str, expected: str) -> None:
            if not cond:
                got = getattr(self, field)
                raise DPError(f"DPConfig.{field} (bank {self.bank_id!r}): expected {expected}, got {got!r}")

        def finite_positive(field: str) -> None:
            value = getattr(self, field)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            need(ok, field, "a finite number > 0")

        def positive_int(field: str) -> None:
            value = getattr(self, field)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field, "an integer >= 1")

        finite_positive("target_epsilon")
        finite_positive("delta")
        need(self.delta < 1, "delta", "a number in (0, 1)")
        finite_positive("clip_norm")
        finite_positive("lr")
        for name in ("planned_rounds", "local_steps", "expected_batch_size", "physical_batch_size"):
            positive_int(name)
        need(self.accountant in ACCOUNTANTS, "accountant", f"one of {list(ACCOUNTANTS)}")
        need(self.grad_sample_mode in GRAD_SAMPLE_MODES, "grad_sample_mode", f"one of {list(GRAD_SAMPLE_MODES)}")
        need(self.privacy_unit in PRIVACY_UNITS, "privacy_unit", f"one of {list(PRIVACY_UNITS)}")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {list(OPTIMIZERS)}")
        need(isinstance(self.secure_mode, bool), "secure_mode", "a bool")
        need(self.weight_decay >= 0 and math.isfinite(self.weight_decay), "weight_decay", "a finite number >= 0")
        need(0 <= self.momentum < 1, "momentum", "a number in [0, 1)")
        need(isinstance(self.bank_id, str) and bool(self.bank_id), "bank_id", "a non-empty string")

    @property
    def total_planned_steps(self) -> int:
        return self.planned_rounds * self.local_steps

    def replace(self, **changes: Any) -> DPConfig:
        return dataclasses.replace(self, **changes)
