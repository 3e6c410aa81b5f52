"""The audit's recomputation (issue 32): its memoized epsilons are dp_accounting's for the recorded
history and delta, whatever JSON types the history came in, and the tolerance it grants a recorded value."""

from __future__ import annotations

import logging

import pytest

from fedmoe.audit.verify import _Recompute
from fedmoe.protocol.accounting import PRV_EPS_ERROR, epsilon_pld, epsilon_rdp, epsilon_replace_one, epsilon_tolerance

HISTORY = [[1.1, 0.02, 30], [0.9, 0.05, 10]]


@pytest.mark.parametrize(
    ("method", "reference"), [("pld", epsilon_pld), ("rdp", epsilon_rdp), ("replace_one", epsilon_replace_one)]
)
def test_recomputed_epsilon_is_the_accountants_for_that_history_and_delta(method, reference):
    recompute = getattr(_Recompute(), method)
    expected = reference(HISTORY, delta=1e-5)
    assert recompute(HISTORY, 1e-5) == expected > 0
    assert recompute([[1.1, 0.02, 30.0], (0.9, 0.05, 10)], 1e-5) == expected  # JSON floats for steps, tuples
    assert recompute(HISTORY, 1e-3) == reference(HISTORY, delta=1e-3) < expected  # delta is not ignored
    assert recompute(HISTORY[:1], 1e-5) == reference(HISTORY[:1], delta=1e-5) < expected
    assert recompute([], 1e-5) == 0.0


def test_the_two_recomputations_differ():
    recompute = _Recompute()
    assert recompute.rdp(HISTORY, 1e-5) > recompute.pld(HISTORY, 1e-5)  # RDP is the looser bound


@pytest.mark.parametrize("reference", [2.0, -2.0])
def test_tolerance_is_one_percent_plus_prv_error_above(reference):
    below, above = epsilon_tolerance(reference, accountant="prv")
    assert below == pytest.approx(0.02 + 1e-9, abs=1e-15) and above == pytest.approx(below + PRV_EPS_ERROR, abs=1e-15)
    assert epsilon_tolerance(reference, accountant="rdp") == (below, below)
    assert epsilon_tolerance(reference, accountant="rdp", rel_tol=0.1) == pytest.approx((0.2, 0.2), abs=1e-8)
    assert epsilon_tolerance(0.0, accountant="rdp") == (1e-9, 1e-9)
    assert PRV_EPS_ERROR == 0.01


def test_rdp_uses_the_large_orders_and_drops_only_its_convergence_warnings(caplog):
    """Small sigma: dp_accounting excludes orders whose series does not converge and says so per
    order; epsilon_rdp keeps that quiet during its own call only, and uses RDP_ORDERS (our grid)."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    from fedmoe.protocol.accounting import RDP_ORDERS, _drop_rdp_convergence_warnings

    noisy = [[0.5, 0.9, 10]]
    with caplog.at_level(logging.WARNING, logger="absl"):
        value = epsilon_rdp(noisy, delta=1e-5)
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]
    assert _drop_rdp_convergence_warnings not in logging.getLogger("absl").filters
    for history in (noisy, HISTORY, [[10.0, 0.001, 1]]):  # the last: dp_accounting's default orders give another value
        accountant = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS))
        for sigma, q, steps in history:
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        assert epsilon_rdp(history, delta=1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert value == epsilon_rdp(noisy, delta=1e-5)
