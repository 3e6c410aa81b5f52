"""Epsilon of a recorded DP-SGD history, computed with Google's dp_accounting (not Opacus).

The bank writes these numbers into its ledger next to its own accountant's; the audit recomputes
them. Torch-free, so the privacy officer's tool and the server can use it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

# PRV epsilon is an upper bound within eps_error of the truth; 0.01 is Opacus' default.
PRV_EPS_ERROR = 0.01
# dp_accounting PLD grid: a pessimistic (upper-bound) discretization of the privacy loss. 1e-3
# agrees with 1e-4 to ~1e-4 relative on DP-SGD histories and is ~10x faster.
PLD_DISCRETIZATION = 1e-3
# dp_accounting's default RDP orders plus large ones (Opacus' grid reaches 63); both accountants
# then agree to ~1e-4 on DP-SGD histories.
RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(11, 64),
    128.0,
    256.0,
    512.0,
)


def _merged(history: Sequence[Sequence[float]]) -> list[tuple[float, float, int]]:
    """Consecutive equal (sigma, q) joined: k rounds of (sigma, q, s) are one (sigma, q, k*s)."""
    out: list[tuple[float, float, int]] = []
    for sigma, q, steps in history:
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(steps))
        elif steps:
            out.append((float(sigma), float(q), int(steps)))
    return out


def _dp_event(history: Sequence[Sequence[float]]) -> dp_accounting.DpEvent | None:
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
        for sigma, q, steps in _merged(history)
    ]
    if not events:
        return None
    return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


def epsilon_pld(history: Sequence[Sequence[float]], *, delta: float) -> float:
    """Epsilon of a DP-SGD history at `delta` by dp_accounting's PLD accountant (not Opacus).

    Each entry (sigma, q, steps) is `steps` compositions of a Poisson-subsampled Gaussian
    (add/remove neighbours, as Opacus). The PLD is discretized pessimistically, so the value
    is an upper bound (Koskela et al. 2020; Doroshenko et al. 2022, "Connect the dots").

    Args:
        history: [(noise_multiplier, sample_rate, steps)], oldest first.
        delta: the bank's delta.

    Returns:
        Epsilon (0.0 for an empty history).
    """
    event = _dp_event(history)
    if event is None:
        return 0.0
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def epsilon_replace_one(history: Sequence[Sequence[float]], *, delta: float) -> float:
    """Epsilon of a DP-SGD history at `delta` under *replace-one* adjacency (dp_accounting's PLD).

    Add/remove neighbours (`epsilon_pld`, Opacus) hide the dataset size n; replace-one treats n as
    public. A bank's sigma is calibrated from q = B/n, so its noise level (and whether a batch size
    is refused) depends on n: for anyone who learns n that way, replace-one is the adjacency that
    counts. Banks enforce their budget under both (issue 26); 0.0 for an empty history.
    """
    event = _dp_event(history)
    if event is None:
        return 0.0
    accountant = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
        value_discretization_interval=PLD_DISCRETIZATION,
    )
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def epsilon_rdp(history: Sequence[Sequence[float]], *, delta: float) -> float:
    """Epsilon of a DP-SGD history at `delta` by dp_accounting's RDP accountant (Mironov et al. 2019).

    An upper bound looser than PLD/PRV; independent of Opacus' RDP code.
    """
    event = _dp_event(history)
    if event is None:
        return 0.0
    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS))
    # Small sigma: the series of some fractional orders does not converge; dp_accounting drops
    # those orders (the bound stays valid, only looser) and says so once per order via absl.
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_drop_rdp_convergence_warnings)
    try:
        accountant.compose(event)
        return float(accountant.get_epsilon(delta))
    finally:
        absl_logger.removeFilter(_drop_rdp_convergence_warnings)


def _drop_rdp_convergence_warnings(record: logging.LogRecord) -> bool:
    return "failed to converge" not in str(record.msg)


def epsilon_tolerance(reference: float, *, accountant: str, rel_tol: float = 0.01) -> tuple[float, float]:
    """How far (below, above) a recorded epsilon may sit from an independent recomputation.

    1% of `reference` either way. PRV values are upper bounds within `PRV_EPS_ERROR` (absolute)
    above the truth, and PLD (pessimistic) is within ~1e-4 of it, so a PRV value may also sit
    up to PRV_EPS_ERROR *above* the PLD; never more than 1% below it (under-reporting).

    Returns:
        (below, above): recorded - reference must lie in [-below, above].
    """
    slack = rel_tol * abs(reference) + 1e-9
    return slack, slack + (PRV_EPS_ERROR if accountant == "prv" else 0.0)
