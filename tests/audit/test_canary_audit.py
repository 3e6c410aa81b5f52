"""The one-run canary audit (Steinke, Nasr & Jagielski 2023): the bound, and real private runs.

A run without noise must be caught (lower bound far above a small claimed epsilon); a correct
private run (epsilon 2) must not be refuted; neither it nor a planted understatement may PASS
unless the audit caught a positive control at twice the claim (issue 26).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmoe.audit import (
    AuditError,
    CanaryAuditConfig,
    CanaryAuditResult,
    count_guesses,
    epsilon_lower_bound,
    p_value,
    run_canary_audit,
)
from fedmoe.audit.__main__ import main


def test_p_value_is_the_binomial_tail_plus_the_delta_term():
    # delta = 0: exactly P[Binomial(r, e^eps / (1 + e^eps)) >= v]
    q = 1 / (1 + math.exp(-1.0))
    tail = sum(math.comb(10, k) * q**k * (1 - q) ** (10 - k) for k in range(8, 11))
    assert p_value(m=100, r=10, v=8, epsilon=1.0, delta=0.0) == pytest.approx(tail, rel=1e-12)
    # the delta term: 2 m delta max_i P[v - i <= W < v] / i, here at i = 1: P[W = 7]
    at_7 = math.comb(10, 7) * q**7 * (1 - q) ** 3
    pmf = [math.comb(10, k) * q**k * (1 - q) ** (10 - k) for k in range(8)]
    alpha = max(sum(pmf[8 - i : 8]) / i for i in range(1, 9))
    assert alpha == pytest.approx(at_7)
    assert p_value(m=100, r=10, v=8, epsilon=1.0, delta=1e-3) == pytest.approx(tail + 2 * 100 * 1e-3 * alpha)
    assert p_value(m=100, r=10, v=0, epsilon=1.0, delta=1e-3) == 1.0
    ps = [p_value(m=1000, r=200, v=150, epsilon=e, delta=1e-5) for e in (0.0, 0.5, 1.0, 2.0)]
    assert ps == sorted(ps)
    with pytest.raises(AuditError, match=r"expected 0 <= v <= r <= m, got v=11, r=10, m=100"):
        p_value(m=100, r=10, v=11, epsilon=1.0, delta=0.0)


def test_lower_bound_matches_the_closed_form_and_the_delta_term_only_lowers_it():
    # All r guesses right, delta = 0: reject while (e^eps / (1 + e^eps))^r < 0.05.
    for r in (10, 100, 250):
        closed = math.log(0.05 ** (1 / r) / (1 - 0.05 ** (1 / r)))
        assert epsilon_lower_bound(m=1000, r=r, v=r, delta=0.0) == pytest.approx(closed, abs=1e-9)
    with_delta = epsilon_lower_bound(m=1000, r=250, v=250, delta=1e-5)
    assert with_delta < epsilon_lower_bound(m=1000, r=250, v=250, delta=0.0)
    assert 4.3 < with_delta < 4.45
    assert epsilon_lower_bound(m=1000, r=250, v=125, delta=1e-5) == 0.0  # chance
    assert epsilon_lower_bound(m=1000, r=250, v=250, delta=0.01) == 0.0  # 2 m delta swamps 0.05


def test_count_guesses_top_in_bottom_out_with_random_ties():
    scores = np.array([5.0, 4.0, 0.0, 0.0, 0.0, -1.0])
    included = np.array([True, True, False, True, False, False])
    assert count_guesses(scores, included, k_plus=2, k_minus=1, seed=0) == (3, 3)
    assert count_guesses(scores, included, k_plus=3, k_minus=0, seed=0)[0] == 3
    tied = {count_guesses(scores, included, k_plus=3, k_minus=0, seed=s)[1] for s in range(20)}
    assert tied == {2, 3}  # the third "in" guess falls on one of three tied zeros
    with pytest.raises(AuditError, match="k_plus \\+ k_minus <= m=6"):
        count_guesses(scores, included, k_plus=4, k_minus=3, seed=0)


def test_run_without_noise_is_caught():
    claimed = 0.5
    result = run_canary_audit(CanaryAuditConfig(canaries=1000, target_epsilon=claimed, noise_multiplier_override=0.0))
    assert result.fault_injected and result.noise_multiplier == 0.0
    assert (result.guesses, result.k_plus, result.k_minus) == (250, 250, 0)
    assert result.correct == result.guesses  # every sampled canary stands out
    assert result.epsilon_lower_bound > 4.0 >= 8 * claimed  # 4.39 at m=1000, k+=250
    assert not result.passed and result.p_value_at_claim < 0.05
    assert "FAIL" in result.summary()


def test_a_true_claim_is_not_refuted_but_without_power_it_is_inconclusive_not_a_pass():
    """Issue 26: a PASS needs the audit to have caught a positive control (a mechanism at 2x the
    claim). At m=1000 the one-run bound is too weak for that, so a true claim is INCONCLUSIVE."""
    result = run_canary_audit(CanaryAuditConfig(canaries=1000, target_epsilon=2.0, control_factors=(2.0,)))
    assert not result.fault_injected and result.noise_multiplier > 1.0  # calibrated for the claim
    assert result.epsilon_lower_bound <= result.claimed_epsilon == 2.0 and not result.refuted
    assert [eps for eps, _, _ in result.controls] == [4.0, math.inf]  # 2x the claim, then no noise
    assert result.controls[-1][2] > 2.0  # the run without noise is caught: the pipeline has some power
    assert result.verdict == "INCONCLUSIVE" and not result.passed
    assert "INCONCLUSIVE" in result.summary() and "nothing short of a run without noise" in result.summary()


@pytest.mark.parametrize("sigma", [0.3])
def test_a_planted_understatement_never_passes(sigma):
    """Issue 26: sigma 0.3 claiming epsilon 2 (its true epsilon is ~60) PASSed the old audit."""
    result = run_canary_audit(CanaryAuditConfig(canaries=1000, target_epsilon=2.0, noise_multiplier=sigma,
                                                control_factors=(2.0,)))  # fmt: skip
    assert result.noise_multiplier == sigma and result.claimed_epsilon == 2.0
    assert not result.passed and result.verdict in ("FAIL", "INCONCLUSIVE"), result.summary()


def _result(bound: float, controls: tuple) -> CanaryAuditResult:
    return CanaryAuditResult(
        canaries=1000, in_canaries=500, k_plus=250, k_minus=0, guesses=250, correct=200, confidence=0.95,
        delta=1e-5, epsilon_lower_bound=bound, claimed_epsilon=2.0, p_value_at_claim=0.5, noise_multiplier=1.0,
        sample_rate=0.1, steps=30, n_samples=600, fault_injected=False, seconds=1.0, max_certifiable_epsilon=4.4,
        controls=controls,
    )  # fmt: skip


def test_pass_needs_the_claim_to_survive_and_the_first_positive_control_to_be_caught():
    assert _result(1.0, ((4.0, 1.0, 2.5),)).verdict == "PASS"
    assert _result(1.0, ((4.0, 1.0, 0.5), (8.0, 0.7, 2.1))).verdict == "INCONCLUSIVE"
    assert _result(1.0, ((4.0, 1.0, 0.5), (8.0, 0.7, 2.1))).smallest_refutable == 8.0
    assert _result(1.0, ()).verdict == "INCONCLUSIVE"
    assert _result(2.5, ()).verdict == "FAIL"


def test_cli_empirical_fault_injection_fails(tmp_path, capsys):
    out = tmp_path / "audit"
    code = main(["--empirical", "--inject-no-noise", "--canaries", "400", "--epsilon", "1", "--out", str(out)])
    assert code == 1
    printed = capsys.readouterr().out
    assert "empirical audit" in printed and "FAIL" in printed and "AUDIT FAILED" in printed
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Empirical audit" in html and "fault injected" in html


def test_config_is_validated():
    with pytest.raises(AuditError, match=r"k_plus/k_minus: expected .* got 600, 500"):
        CanaryAuditConfig(canaries=1000, k_plus=600, k_minus=500)
    with pytest.raises(AuditError, match="noise_multiplier_override: expected None or >= 0, got -1"):
        CanaryAuditConfig(noise_multiplier_override=-1.0)


def test_a_claim_above_what_the_canaries_can_certify_is_never_a_pass():
    """m = 1000 canaries, 250 guesses certify at most ~4.4: a sigma = 0 run claiming 8 is not testable."""
    result = run_canary_audit(CanaryAuditConfig(canaries=1000, target_epsilon=8.0, noise_multiplier_override=0.0))
    assert result.max_certifiable_epsilon < 8.0
    assert not result.testable and not result.passed and result.controls == ()
    assert result.verdict == "INCONCLUSIVE" and "certify at most" in result.summary()
    assert result.to_dict()["verdict"] == result.verdict
