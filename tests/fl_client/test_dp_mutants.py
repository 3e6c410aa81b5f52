"""Tests that bite (issue 32): the DP noise, its source, the Poisson sampler and the accountants' merging.

Each test here kills a deliberate small bug that the older tests let through (docs/testing.md):
noise std x 0.96, Opacus' torch.normal instead of the CSPRNG, sampling at 2q, merging rounds of
equal sigma whatever their q. Statistical bounds are 6 standard errors (two-sided p ~ 2e-9 per
check, so the whole file fails by chance with probability < 1e-7) and the bugs sit at 10 or more.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedmoe.fl_client.dp import AccountantState, BudgetExceeded, DPConfig, DPError
from fedmoe.fl_client.dp.accountant import (
    HistoryEntry,
    check_budget,
    epsilon_for_history,
    epsilon_replace_one,
    sample_rate_for,
)
from fedmoe.fl_client.dp.engine import SecureDPOptimizer, SecureDPOptimizerFastGradientClipping
from fedmoe.fl_client.dp.rng import PoissonBatchSampler
from fedmoe.protocol.accounting import epsilon_pld, epsilon_rdp

SIGMA, CLIP = 1.3, 0.7  # std = 0.91; a mutant's sigma / C, sigma + C or sigma alone all differ from it
SIDE = 1000  # a [1000, 1000] parameter: 10^6 noise coordinates


def secure_optimizer(cls, params: list[nn.Parameter]):
    base = torch.optim.SGD(params, lr=1.0)
    return cls(base, noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=1, secure_mode=True)


def noisy_step(cls, summed: list[torch.Tensor]) -> list[torch.Tensor]:
    """p.grad after add_noise of one secure optimizer whose summed clipped gradients are `summed`."""
    params = [nn.Parameter(torch.zeros_like(s)) for s in summed]
    opt = secure_optimizer(cls, params)
    for p, s in zip(params, summed, strict=True):
        p.summed_grad = s.clone()
    opt.add_noise()
    return [p.grad for p in params]


def assert_std(noise: torch.Tensor, std: float) -> None:
    """Sample mean and variance within 6 standard errors of N(0, std^2): var's relative error is
    sqrt(2 / n) = 0.14 % at n = 10^6, so the bound is 0.85 % and std x 0.96 (var -7.8 %) is 9x outside."""
    z = noise.double().flatten() / std
    n = z.numel()
    assert abs(z.mean().item()) < 6 / math.sqrt(n)
    assert abs(z.var().item() - 1.0) < 6 * math.sqrt(2 / n), f"std {z.std().item() * std:.5f}, expected {std:.5f}"


@pytest.mark.parametrize("cls", [SecureDPOptimizer, SecureDPOptimizerFastGradientClipping])
def test_secure_noise_has_std_sigma_times_clip_on_every_parameter(cls):
    signal = torch.linspace(-3.0, 3.0, SIDE * SIDE).view(SIDE, SIDE)  # the noise is added to it, in place
    small = torch.full((7, 3), 2.0)
    grad, grad_small = noisy_step(cls, [signal, small])
    assert grad.shape == (SIDE, SIDE) and grad_small.shape == (7, 3)
    assert_std(grad - signal, SIGMA * CLIP)
    assert not torch.equal(grad_small, small)  # the second parameter is noised too
    assert abs((grad_small - small).mean().item()) < 6 * SIGMA * CLIP / math.sqrt(21)


def test_secure_noise_marks_the_gradient_processed():
    """Opacus refuses a second add_noise on the same summed gradient (no double noise, no reuse)."""
    params = [nn.Parameter(torch.zeros(4))]
    opt = secure_optimizer(SecureDPOptimizer, params)
    params[0].summed_grad = torch.zeros(4)
    opt.add_noise()
    with pytest.raises(ValueError):
        opt.add_noise()


def test_secure_noise_ignores_torch_global_generator():
    """Opacus' own add_noise (secure_mode without torchcsprng) draws torch.normal from the global
    generator: the same seed would give the same noise, and the generator's state would move."""
    summed = [torch.zeros(1000)]
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    (first,) = noisy_step(SecureDPOptimizer, summed)
    assert torch.equal(torch.get_rng_state(), state), "the secure noise drew from torch's global generator"
    torch.manual_seed(1234)
    (second,) = noisy_step(SecureDPOptimizer, summed)
    assert not torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------
# Poisson sampling: the inclusion count of every step is Binomial(n, q)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("secure", [True, False])
def test_poisson_inclusion_rate_is_binomial_n_q(secure):
    n, q, steps = 200_000, 0.01, 5  # each batch ~ Binomial(n, q): mean 2000, sd 44.5; 2q is 45 sd off
    generator = None if secure else torch.Generator().manual_seed(11)
    sampler = PoissonBatchSampler(n, q, steps, generator=generator, secure=secure)
    assert len(sampler) == steps
    batches = list(sampler)
    assert len(batches) == steps
    sd = math.sqrt(n * q * (1 - q))
    for batch in batches:
        assert abs(len(batch) - n * q) < 6 * sd, (len(batch), n * q)
        assert batch == sorted(set(batch)) and 0 <= batch[0] and batch[-1] < n
    total = sum(len(b) for b in batches)
    assert abs(total - steps * n * q) < 6 * math.sqrt(steps) * sd
    # the steps are independent draws, not one batch repeated
    assert len(set(batches[0]) & set(batches[1])) < n * q * q + 6 * math.sqrt(n * q * q)


def test_poisson_rate_one_and_zero_are_exact():
    assert list(PoissonBatchSampler(50, 1.0, 2, generator=None, secure=True)) == [list(range(50))] * 2
    assert list(PoissonBatchSampler(50, 0.0, 3, generator=None, secure=True)) == [[], [], []]


def test_poisson_sampler_refuses_a_generator_under_secure_mode_and_none_without():
    message = "^secure sampling takes no generator; seeded sampling needs one$"
    with pytest.raises(AssertionError, match=message):
        PoissonBatchSampler(10, 0.5, 1, generator=torch.Generator(), secure=True)
    with pytest.raises(AssertionError, match=message):
        PoissonBatchSampler(10, 0.5, 1, generator=None, secure=False)


def test_seeded_sampling_is_its_generators_float64_uniforms_whatever_the_global_seed():
    """Seeded runs (where a bank's policy allows them) replay exactly: 53-bit uniforms from the
    sampler's own generator, never torch's global one."""
    n, q = 5000, 0.3
    reference = torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = torch.nonzero(reference < q).flatten().tolist()
    torch.manual_seed(1)
    first = next(iter(PoissonBatchSampler(n, q, 1, generator=torch.Generator().manual_seed(5), secure=False)))
    torch.manual_seed(2)
    second = next(iter(PoissonBatchSampler(n, q, 1, generator=torch.Generator().manual_seed(5), secure=False)))
    assert first == second == expected


# ---------------------------------------------------------------------------------------------
# Accountant histories: rounds of equal sigma and different q are two mechanisms, not one
# ---------------------------------------------------------------------------------------------

SIG, Q_LO, Q_HI, STEPS, DELTA = 1.0, 0.01, 0.04, 40, 1e-5

ACCOUNTANTS = {
    "opacus-prv": lambda h: epsilon_for_history(h, delta=DELTA, mechanism="prv"),
    "opacus-rdp": lambda h: epsilon_for_history(h, delta=DELTA, mechanism="rdp"),
    "replace-one": lambda h: epsilon_replace_one(h, delta=DELTA),
    "pld": lambda h: epsilon_pld(h, delta=DELTA),
    "rdp": lambda h: epsilon_rdp(h, delta=DELTA),
}


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_equal_sigma_different_q_is_not_merged(name):
    """A merge that ignores q would account both rounds at the first round's q."""
    eps = ACCOUNTANTS[name]
    only_lo = eps([HistoryEntry(SIG, Q_LO, 2 * STEPS)])
    only_hi = eps([HistoryEntry(SIG, Q_HI, 2 * STEPS)])
    lo_then_hi = eps([HistoryEntry(SIG, Q_LO, STEPS), HistoryEntry(SIG, Q_HI, STEPS)])
    hi_then_lo = eps([HistoryEntry(SIG, Q_HI, STEPS), HistoryEntry(SIG, Q_LO, STEPS)])
    assert only_lo < 0.9 * lo_then_hi and hi_then_lo < 0.9 * only_hi, (only_lo, lo_then_hi, hi_then_lo, only_hi)
    assert lo_then_hi == pytest.approx(hi_then_lo, rel=0.02)  # composition does not depend on the order


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_equal_q_different_sigma_is_not_merged(name):
    eps = ACCOUNTANTS[name]
    mixed = eps([HistoryEntry(0.8, Q_LO, STEPS), HistoryEntry(2.0, Q_LO, STEPS)])
    assert eps([HistoryEntry(2.0, Q_LO, 2 * STEPS)]) < 0.9 * mixed < 0.9 * eps([HistoryEntry(0.8, Q_LO, 2 * STEPS)])


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_equal_rounds_merge_into_their_total_steps(name):
    eps = ACCOUNTANTS[name]
    split = eps([HistoryEntry(SIG, Q_LO, STEPS), HistoryEntry(SIG, Q_LO, STEPS), HistoryEntry(SIG, Q_LO, STEPS)])
    assert split == eps([HistoryEntry(SIG, Q_LO, 3 * STEPS)])
    assert split > eps([HistoryEntry(SIG, Q_LO, 2 * STEPS)]) > eps([HistoryEntry(SIG, Q_LO, STEPS)])


@pytest.mark.parametrize("name", ["pld", "rdp", "replace-one"])
def test_a_round_of_zero_steps_costs_nothing(name):
    eps = ACCOUNTANTS[name]
    assert eps([]) == 0.0 and eps([HistoryEntry(SIG, Q_LO, 0)]) == 0.0
    with_empty = eps([HistoryEntry(SIG, Q_LO, STEPS), HistoryEntry(3.0, Q_HI, 0), HistoryEntry(SIG, Q_LO, STEPS)])
    assert with_empty == pytest.approx(eps([HistoryEntry(SIG, Q_LO, 2 * STEPS)]), rel=1e-3)


# ---------------------------------------------------------------------------------------------
# The budget check reads epsilon *after* the round; q = B / n and its limits
# ---------------------------------------------------------------------------------------------

ROUND = HistoryEntry(SIG, Q_LO, STEPS)


def budget_config(target: float, **overrides) -> DPConfig:
    return DPConfig(target_epsilon=target, delta=DELTA, bank_id="bank-m", **overrides)


def test_check_budget_reports_before_and_after_and_refuses_only_past_the_target():
    state = AccountantState.fresh(budget_config(1.0)).appended(ROUND)
    before, after = state.epsilon(), state.appended(ROUND).epsilon()
    assert 0 < before < after
    # the budget holds under both adjacencies (issue 26): the larger epsilon after the round is what counts
    limit = max(after, epsilon_replace_one(state.appended(ROUND).history, delta=DELTA))
    exact = check_budget(budget_config(limit), state, ROUND)  # a round that lands on the target is allowed
    assert (exact.entry, exact.epsilon_before, exact.epsilon_after) == (ROUND, before, after)
    spent = max(before, epsilon_replace_one(state.history, delta=DELTA))
    assert spent < limit
    between = (spent + limit) / 2  # the budget still has room before the round, not after it
    with pytest.raises(BudgetExceeded, match="would bring epsilon to"):
        check_budget(budget_config(between), state, ROUND)
    with pytest.raises(DPError, match="accountant"):  # a state of another accountant is not this bank's
        check_budget(budget_config(limit, accountant="rdp"), state, ROUND)


def test_sample_rate_is_batch_over_units_and_needs_a_batch_of_units():
    cfg = budget_config(1.0, expected_batch_size=8, physical_batch_size=8)
    assert sample_rate_for(cfg, 8) == 1.0 and sample_rate_for(cfg, 200) == 0.04
    for n in (7, 0):
        with pytest.raises(DPError, match="needs at least that many"):
            sample_rate_for(cfg, n)
    single = budget_config(1.0, expected_batch_size=1, physical_batch_size=1)
    assert sample_rate_for(single, 1) == 1.0  # one unit, batch of one: q = 1 is allowed
    with pytest.raises(DPError):
        sample_rate_for(single, 0)
