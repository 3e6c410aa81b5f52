"""The federated update rule: what every bank does with the decrypted mean of the banks' updates.

DP-FedSGD with an adaptive update (McMahan et al., ICLR 2018; Reddi et al., ICLR 2021). Each bank
releases its privatized update over K = `local-steps` DP-SGD steps of plain SGD at `local-lr`
(clipped per sample, noised, then clamped per coordinate: post-processing); the secure sum is
averaged; then EVERY bank applies the same optimizer to that mean, with the pseudo-gradient
g = -mean delta:

    adam   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
           x -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)     (torch.optim.Adam's order)
    sgdm   m = b1 m + g;  x -= lr * m                                       (torch.optim.SGD, momentum b1)
    mean   x += mean delta (the old round: local AdamW at `lr`, the plain mean)

Why an adaptive update on the mean: Adam divides by the mean's own noise level, which falls as
sqrt(N) with N banks, so more banks make longer steps in the signal's direction; a bank's local
AdamW divides by its own noise and cancels what averaging gains (docs/utility.md).

The state (m, v, t) is a function of the sequence of aggregates only: every bank holds the same
values, computes in float64 on CPU in a fixed order, so replicas stay bit-equal and the server never
needs plaintext. It is post-processing of DP outputs: no privacy cost. It lives in the bank's
replica file, the job's commit point (fedmoe.fl_client.bank).

Shape legend: N = trainable coordinates (the flat trainable view).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmoe.fl_client.dp.config import DPConfig
from fedmoe.protocol.config import UPDATE_RULES, JobConfig
from fedmoe.protocol.errors import ConfigError

__all__ = ["UPDATE_RULES", "FedOptState", "FedOptimizer", "fed_step", "local_dp_config", "update_clamp"]
# Tensor names of the optimizer state inside the replica file (beside the trainable view's names).
STATE_PREFIX = "fedopt."


@dataclass(frozen=True)
class FedOptimizer:
    """The update rule every bank applies to the decrypted mean (from the job)."""

    rule: str = "adam"
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    @classmethod
    def of(cls, job: JobConfig) -> FedOptimizer:
        return cls(job.update_rule, job.lr, job.beta1, job.beta2, job.adam_eps)

    @property
    def stateful(self) -> bool:
        return self.rule != "mean"


@dataclass(frozen=True)
class FedOptState:
    """Optimizer state after `step` applied aggregates: exp_avg m_N, exp_avg_sq v_N (float64, [N])."""

    step: int
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor

    @classmethod
    def fresh(cls, numel: int) -> FedOptState:
        zeros = torch.zeros(numel, dtype=torch.float64)
        return cls(0, zeros, zeros.clone())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"{STATE_PREFIX}exp_avg": self.exp_avg,
            f"{STATE_PREFIX}exp_avg_sq": self.exp_avg_sq,
            f"{STATE_PREFIX}step": torch.tensor([self.step], dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], numel: int, *, source: str) -> FedOptState:
        """The state saved by `to_tensors`; a fresh one where the file holds none.

        Raises:
            ConfigError: the saved state is partial or its size is not the trainable view's.
        """
        names = [f"{STATE_PREFIX}{k}" for k in ("exp_avg", "exp_avg_sq", "step")]
        present = [n for n in names if n in tensors]
        if not present:
            return cls.fresh(numel)
        if len(present) != len(names):
            raise ConfigError(f"{source}: optimizer state expected tensors {names}, got {present}")
        m, v = tensors[names[0]].double(), tensors[names[1]].double()
        if m.shape != (numel,) or v.shape != (numel,):
            raise ConfigError(
                f"{source}: optimizer state expected shape ({numel},), got {tuple(m.shape)} and {tuple(v.shape)}"
            )
        return cls(int(tensors[names[2]].item()), m, v)


def fed_step(opt: FedOptimizer, state: FedOptState, mean_delta_N: torch.Tensor) -> tuple[torch.Tensor, FedOptState]:
    """The update to add to the global trainable view, and the new state; a pure function.

    Args:
        opt: the job's rule and its hyperparameters.
        state: the state after the previous aggregate.
        mean_delta_N: the decrypted mean of the banks' updates (any float dtype, [N]).

    Returns:
        (update_N float32, new state): the replica moves by `update_N`.
    """
    d = mean_delta_N.to(torch.float64)
    if opt.rule == "mean":
        return d.float(), FedOptState(state.step + 1, state.exp_avg, state.exp_avg_sq)
    g = -d  # pseudo-gradient
    t = state.step + 1
    if opt.rule == "sgdm":
        m = g.clone() if state.step == 0 else state.exp_avg * opt.beta1 + g  # torch SGD: first buffer = g
        return (-opt.lr * m).float(), FedOptState(t, m, state.exp_avg_sq)
    m = torch.lerp(state.exp_avg, g, 1 - opt.beta1)  # as torch.optim.Adam: m + (1 - b1)(g - m)
    v = state.exp_avg_sq * opt.beta2 + g * g * (1 - opt.beta2)
    bias1, bias2 = 1 - opt.beta1**t, 1 - opt.beta2**t
    denom = (v.sqrt() / bias2**0.5) + opt.eps
    return (-(opt.lr / bias1) * m / denom).float(), FedOptState(t, m, v)


def update_clamp(job: JobConfig) -> float:
    """The per-coordinate bound on one bank's released update under adam/sgdm: local-lr x K x clip.

    One DP-SGD step moves a coordinate by local-lr x (clipped sum + noise) / B; the clipped mean has
    L2 norm <= C x |batch| / B (about C), its noise per coordinate is sigma C / B (0.02 C at the
    defaults). The bank clamps every coordinate of its update to this bound before it leaves
    (post-processing: no privacy cost; it binds only where sigma / B is large), so every honest
    mean lies within it and `aggregate_check` can reject anything outside without exception.
    """
    return job.local_lr * job.local_steps * job.clip_norm


def local_dp_config(job: JobConfig, cfg: DPConfig) -> DPConfig:
    """The bank's DP config with the job's local update: plain SGD at local-lr under adam/sgdm (the
    adaptive step is the mean's, applied by every bank), local AdamW at lr under `mean`; the
    physical batch (memory only) from physical-batch-size."""
    physical = job.physical_batch_size or job.batch_size
    if job.update_rule == "mean":
        return cfg.replace(optimizer="adamw", lr=job.lr, physical_batch_size=physical)
    return cfg.replace(optimizer="sgd", lr=job.local_lr, momentum=0.0, physical_batch_size=physical)
