"""A bank checks every decrypted aggregate before applying it: one bad bank must not break the rest.

Under encryption (and secure aggregation) nobody can inspect one bank's contribution, so the
defence works on the aggregate, identically at every honest bank (decryption is deterministic):

- every value finite;
- the total weight is the number of contributors (each bank encrypts weight 1), so it must be
  an integer within [min-banks, max-banks] of the job;
- no coordinate of the mean update larger than what honest training can produce.

The bound on a coordinate, update rules adam and sgdm (DP-FedSGD, fedmoe.fl_client.fedopt). Every
bank clamps each coordinate of its released update to `update_clamp` = local-lr x local-steps x
clip-norm before it leaves (post-processing of its DP output). The mean of honest updates then lies
within the same bound by construction, so the check accepts every honest aggregate; secure
aggregation's fixed-point error (<= 2^-21 per coordinate) is covered by `QUANTIZATION_SLACK`.
The check bounds the mean, not the optimizer's step: Adam's step is bounded whatever the input, but
a huge poisoned coordinate would freeze that coordinate's second moment for many rounds.

The bound on a coordinate, update rule mean (the old round). Banks train with AdamW (betas
0.9/0.999, no weight decay). One step moves a coordinate by lr * |m_hat| / (sqrt(v_hat) + eps).
By Cauchy-Schwarz over the exponential averages, |m_hat| / sqrt(v_hat) <= sqrt((1-b1)^2 / (1-b2) * 1 / (1 - b1^2/b2))
= sqrt(10 * 5.29) ~= 7.27 for any step count and any gradients (noise included). A round of
`local-steps` steps therefore moves each coordinate by at most 7.27 * lr * steps; the mean of
honest banks' updates obeys the same bound. We allow `ADAM_STEP_BOUND` = 8 per step.

What this leaves a malicious bank (stated in README's threat model): it can still move each
coordinate of the mean by up to the bound per round (its own contribution scaled by the number of
contributors), which honest training could also have done; it cannot push values to 1e4 or make
the model non-finite, and a rejected aggregate is never applied (the server quarantines it).
"""

from __future__ import annotations

import numpy as np

from fedmoe.fl_client.fedopt import update_clamp
from fedmoe.protocol.config import JobConfig

ADAM_STEP_BOUND = 8.0  # > 7.27, the AdamW per-step bound derived above
QUANTIZATION_SLACK = 1e-5  # > 2^-21, the largest fixed-point error of the decrypted mean


class AggregateRejected(Exception):
    """A decrypted aggregate failed validation; nothing of it was applied."""

    def __init__(self, round_idx: int, why: str) -> None:
        super().__init__(f"aggregate of round {round_idx} rejected: {why}")
        self.round = round_idx


def coordinate_bound(job: JobConfig) -> float:
    """The largest |coordinate| of a mean update honest banks can produce in one round."""
    if job.update_rule == "mean":
        return ADAM_STEP_BOUND * job.lr * job.local_steps
    return update_clamp(job) + QUANTIZATION_SLACK


def _bound_text(job: JobConfig) -> str:
    if job.update_rule == "mean":
        return f"{ADAM_STEP_BOUND:g} x lr {job.lr:g} x local-steps {job.local_steps}"
    return f"local-lr {job.local_lr:g} x local-steps {job.local_steps} x clip-norm {job.clip_norm:g}, the banks' clamp"


def check_aggregate(job: JobConfig, round_idx: int, mean: np.ndarray, total_weight: float) -> None:
    """Raises AggregateRejected naming what is wrong (counts and bounds, never values of a bank)."""
    bad = int(np.size(mean) - np.count_nonzero(np.isfinite(mean)))
    if bad:
        raise AggregateRejected(round_idx, f"{bad} non-finite value(s) in the mean update")
    contributors = round(total_weight)
    if abs(total_weight - contributors) > 1e-3 or not job.min_banks <= contributors <= job.max_banks:
        raise AggregateRejected(
            round_idx,
            f"total weight {total_weight:.4f} is not a number of contributors in "
            f"[min-banks {job.min_banks}, max-banks {job.max_banks}] (each bank encrypts weight 1)",
        )
    peak = float(np.max(np.abs(mean))) if np.size(mean) else 0.0
    bound = coordinate_bound(job)
    if peak > bound:
        raise AggregateRejected(
            round_idx,
            f"largest |coordinate| of the mean update is {peak:.3g}, "
            f"above the bound {bound:.3g} (= {_bound_text(job)})",
        )


def check_contribution(job: JobConfig, update: np.ndarray) -> str | None:
    """Why one bank's update (opened in an accountable round) is out of bound, or None: finite, and
    every coordinate within the bound an honest bank's own clamped update obeys (the mean's bound)."""
    bad = int(np.size(update) - np.count_nonzero(np.isfinite(update)))
    if bad:
        return f"{bad} non-finite value(s) in its update"
    peak = float(np.max(np.abs(update))) if np.size(update) else 0.0
    bound = coordinate_bound(job)
    if peak > bound:
        return f"largest |coordinate| of its update is {peak:.3g}, above the bound {bound:.3g} (= {_bound_text(job)})"
    return None
