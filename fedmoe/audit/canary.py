"""Empirical privacy audit with one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

T. Steinke, M. Nasr, M. Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
arXiv:2305.08846. m canaries are each put into the training set independently with probability
1/2 (S_i = +1 in, -1 out); one private training run; the auditor scores every canary from the
trained model, guesses "in" for the k+ highest scores and "out" for the k- lowest, abstains on
the rest. If training is (eps, delta)-DP, the number of correct guesses W out of r = k+ + k-
cannot be much larger than a Binomial(r, e^eps / (1 + e^eps)) draw -- randomized response is
the best an (eps, 0)-DP run allows. Their main theorem (Theorem 3), with its delta term:

    P[W >= v]  <=  beta + 2 m delta alpha,
    beta  = P[W' >= v],  alpha = max_{1 <= i <= v} P[v - i <= W' < v] / i,
    W' ~ Binomial(r, e^eps / (1 + e^eps)).

The right-hand side is a p-value for "the run is (eps, delta)-DP"; the 95% lower bound is the
largest eps whose p-value is below 0.05 (`epsilon_lower_bound`, the search of the paper's
appendix code). A lower bound above the epsilon the accountant claims means the implementation
leaks more than it says: the audit fails.

What we run (white-box canaries through the real DP-SGD path). The paper allows black-box
(input canaries, loss scores) and white-box auditors (gradient canaries, parameter access);
any score computed from the trained model is valid. Ours:
    - the bank's data: a synthetic bank corpus (fedmoe.fl_client.data), one record per sample;
    - canary i: a record made of one marker token t_i repeated, where t_i is an id no record and
      no other canary uses (byte tokenizer ids end at 258; the tiny model's vocab is widened to
      hold m markers), so the embedding row t_i moves only when canary i is in a batch (plus noise);
    - training: `train_private_round` on `fedmoe.model.deepseek.preset("tiny")` in train mode "full"
      (every parameter, the embedding included) -- the real per-sample clipping (the configured
      grad_sample_mode), Poisson sampling, Gaussian noise and accountant of fedmoe.fl_client.dp;
    - score_i = < E0[t_i] - E_T[t_i], u_i >, u_i the unit gradient of canary i's loss w.r.t. that
      row at the initial model: how far the row moved down canary i's own gradient. With SGD
      and no weight decay an absent canary's row moves by noise alone.
This is in the spirit of the paper's white-box "Dirac canary" experiments (a canary owns a
coordinate block nobody else touches) while the canary is a real record, clipped with all the
other per-sample gradients. Without noise (a bug) every sampled canary stands out and the bound
is far above any small claimed epsilon; with correct noise it stays below the claim.

Caveat: `train_private_round` sets q = expected_batch / n and calibrates sigma for that q, so
each canary in or out moves q by ~1/n (0.2% here); accountants treat q as fixed. Second order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats

from fedmoe.fl_client.data import generate_bank_corpus, make_bank_profiles, pack_records
from fedmoe.fl_client.dp import AccountantState, DPConfig, DPError, sample_rate_for, train_private_round
from fedmoe.fl_client.dp.trainer import check_data, run_dp_steps
from fedmoe.model.deepseek import DeepseekForCausalLM, lm_loss, preset
from fedmoe.model.lora import configure_trainable
from fedmoe.model.tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)


class AuditError(ValueError):
    """Bad audit arguments or inputs; names the field, expected vs got."""


# ---------------------------------------------------------------------------------------------
# The bound (pure maths)
# ---------------------------------------------------------------------------------------------


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of v or more correct guesses out of r under (epsilon, delta)-DP.

    Steinke, Nasr & Jagielski (NeurIPS 2023), Theorem 3: with W' ~ Binomial(r, e^eps/(1+e^eps)),
    P[W >= v] <= P[W' >= v] + 2 m delta max_{1<=i<=v} P[v-i <= W' < v] / i.

    Args:
        m: canaries (each in with probability 1/2).
        r: guesses made (the rest abstained).
        v: correct guesses.
        epsilon, delta: the DP claim under test.

    Returns:
        The p-value, clipped to [0, 1].

    Raises:
        AuditError: not 0 <= v <= r <= m, epsilon < 0, or delta outside [0, 1].
    """
    if not (0 <= v <= r <= m):
        raise AuditError(f"p_value: expected 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if not epsilon >= 0 or not 0 <= delta <= 1:
        raise AuditError(f"p_value: expected epsilon >= 0 and delta in [0, 1], got epsilon={epsilon}, delta={delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of eps-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[W' >= v]
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    # P[v - i <= W' < v] for i = 1..v: cumulative pmf from v-1 downwards.
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(beta + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that v correct guesses out of r rule out at `confidence`.

    Every claim (eps, delta) with p_value < 1 - confidence is rejected; returns the supremum of
    the rejected epsilons (0.0 if even eps = 0 cannot be rejected), by bisection as in the
    paper's appendix code (the p-value grows with eps).

    Raises:
        AuditError: bad counts, delta or confidence.
    """
    if not 0 < confidence < 1:
        raise AuditError(f"epsilon_lower_bound: confidence expected in (0, 1), got {confidence}")
    significance = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) < significance

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # a perfect score with delta = 0 rejects every eps below ~log(r)
            return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def count_guesses(scores: np.ndarray, included: np.ndarray, *, k_plus: int, k_minus: int, seed: int) -> tuple[int, int]:
    """Guess "in" for the k_plus highest scores and "out" for the k_minus lowest; count the hits.

    Ties are broken by a seeded random permutation (guesses may use randomness independent of
    which canaries were in).

    Returns:
        (r, v): guesses made and correct guesses.

    Raises:
        AuditError: k_plus + k_minus > number of canaries, or shapes that disagree.
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = scores.shape[0]
    if included.shape != (m,) or scores.ndim != 1:
        raise AuditError(f"count_guesses: scores {scores.shape} and included {included.shape}: expected equal (m,)")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise AuditError(
            f"count_guesses: expected k_plus, k_minus >= 0 with k_plus + k_minus <= m={m}, got {k_plus}, {k_minus}"
        )
    shuffle = np.random.default_rng(seed).permutation(m)
    order = shuffle[np.argsort(-scores[shuffle], kind="stable")]  # descending, random among ties
    hits = int(included[order[:k_plus]].sum()) + int((~included[order[m - k_minus :]]).sum())
    return k_plus + k_minus, hits


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


# The audited round: one round of 30 DP-SGD steps; SGD keeps the update linear in the noised
# gradients. Its target_epsilon and delta are replaced by the audit's own (CanaryAuditConfig).
CANARY_ROUND = DPConfig(
    target_epsilon=2.0,
    delta=1e-5,
    planned_rounds=1,
    local_steps=30,
    expected_batch_size=64,
    physical_batch_size=64,
    optimizer="sgd",
    lr=0.05,
    bank_id="canary-audit",
)


@dataclass(frozen=True)
class CanaryAuditConfig:
    """One canary audit of one bank's private round (tiny model, synthetic bank data).

    Attributes:
        canaries: m.
        target_epsilon, delta: the bank's budget for the audited round (sigma is calibrated).
        k_plus, k_minus: "in" / "out" guesses (None: m // 4 and 0). Fixed before the run (no
            search over k, which would need a multiple-testing correction).
        confidence: of the lower bound.
        records: the bank's own records beside the canaries.
        seq_len: tokens per training sample.
        training: the audited DP-SGD round (clip norm, steps, batch, optimizer, accountant...),
            with target_epsilon and delta put in by `dp_config` (default CANARY_ROUND).
        seed: canary draw, tie breaks, batch sampling and noise.
        noise_multiplier_override: FAULT INJECTION for tests/demos: train with this sigma through
            `_train_round_fixed_noise_TEST_ONLY` while the claim stays target_epsilon.
        threads: torch intra-op threads during the run (1 is fastest for the tiny model; restored).
    """

    canaries: int = 1000
    target_epsilon: float = 2.0
    delta: float = 1e-5
    k_plus: int | None = None
    k_minus: int | None = None
    confidence: float = 0.95
    records: int = 100
    seq_len: int = 8
    training: DPConfig = CANARY_ROUND
    seed: int = 0
    noise_multiplier_override: float | None = None
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.canaries < 2:
            raise AuditError(f"CanaryAuditConfig.canaries: expected >= 2, got {self.canaries}")
        if self.records < 0:
            raise AuditError(f"CanaryAuditConfig.records: expected >= 0, got {self.records}")
        k_plus, k_minus = self.guesses
        if k_plus < 0 or k_minus < 0 or k_plus + k_minus > self.canaries or k_plus + k_minus == 0:
            raise AuditError(
                f"CanaryAuditConfig.k_plus/k_minus: expected >= 0 with 0 < k_plus + k_minus <= canaries="
                f"{self.canaries}, got {k_plus}, {k_minus}"
            )
        try:
            self.dp_config()
        except DPError as err:
            raise AuditError(f"CanaryAuditConfig: {err}") from None
        if self.noise_multiplier_override is not None and not self.noise_multiplier_override >= 0:
            raise AuditError(
                "CanaryAuditConfig.noise_multiplier_override: expected None or >= 0, "
                f"got {self.noise_multiplier_override}"
            )

    @property
    def guesses(self) -> tuple[int, int]:
        k_plus = self.canaries // 4 if self.k_plus is None else self.k_plus
        return k_plus, 0 if self.k_minus is None else self.k_minus

    def dp_config(self) -> DPConfig:
        return dataclasses.replace(self.training, target_epsilon=self.target_epsilon, delta=self.delta)


@dataclass(frozen=True)
class CanaryAuditResult:
    """The outcome: the empirical epsilon lower bound next to the claimed epsilon.

    `passed` is False when the lower bound exceeds the claim: the run leaked more than its
    accountant says (a bug in clipping, noise, sampling or accounting). With m canaries and r
    guesses even a perfect attack certifies at most `max_certifiable_epsilon`; a claim above it
    cannot be refuted by this audit, so it is "not testable" (never a PASS).
    """

    canaries: int
    in_canaries: int
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    confidence: float
    delta: float
    epsilon_lower_bound: float
    claimed_epsilon: float
    p_value_at_claim: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    n_samples: int
    fault_injected: bool
    seconds: float
    max_certifiable_epsilon: float = math.inf

    @property
    def testable(self) -> bool:
        return self.claimed_epsilon < self.max_certifiable_epsilon

    @property
    def passed(self) -> bool:
        return self.testable and self.epsilon_lower_bound <= self.claimed_epsilon

    @property
    def verdict(self) -> str:
        if self.epsilon_lower_bound > self.claimed_epsilon:
            return "FAIL"
        return "PASS" if self.testable else "NOT TESTABLE"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "testable": self.testable, "verdict": self.verdict}

    def summary(self) -> str:
        verdict = self.verdict
        if not self.testable:
            verdict += f" (m={self.canaries} canaries certify at most epsilon {self.max_certifiable_epsilon:.2f})"
        return (
            f"{verdict}: epsilon lower bound {self.epsilon_lower_bound:.3f} ({self.confidence:.0%} confidence) vs "
            f"claimed {self.claimed_epsilon:.3f} at delta={self.delta:g}; {self.correct}/{self.guesses} guesses "
            f"correct (k+={self.k_plus}, k-={self.k_minus}) of m={self.canaries} canaries ({self.in_canaries} in); "
            f"sigma={self.noise_multiplier:.4g}, q={self.sample_rate:.4g}, steps={self.steps}"
            + (" [fault injected: noise override]" if self.fault_injected else "")
        )


@dataclass(frozen=True)
class _Units:
    """Training data in the shape `train_private_round` reads: one privacy unit per sample."""

    inputs: torch.Tensor
    targets: torch.Tensor
    unit_ids: list[str]


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _canary_directions(
    model: DeepseekForCausalLM, tokens_ML: torch.Tensor, markers_M: torch.Tensor, *, chunk: int = 256
) -> torch.Tensor:
    """u_i [m, D]: unit gradient of canary i's loss w.r.t. its marker's embedding row.

    Only canary i's input contains t_i, so row t_i of the gradient of the *summed* loss of a
    chunk of canaries is canary i's own: one backward per chunk.
    """
    weight = model.model.embed_tokens.weight
    was_training = model.training
    model.eval()  # no routing-load bookkeeping; the forward is otherwise the same
    rows = []
    try:
        for start in range(0, tokens_ML.shape[0], chunk):
            block = tokens_ML[start : start + chunk]
            loss = lm_loss(model(block[:, :-1]), block[:, 1:], reduction="per_sample").sum()
            (grad,) = torch.autograd.grad(loss, [weight])
            rows.append(grad[markers_M[start : start + chunk]].detach().double())
    finally:
        model.train(was_training)
    directions = torch.cat(rows)
    return directions / directions.norm(dim=1, keepdim=True).clamp(min=1e-30)


def run_canary_audit(config: CanaryAuditConfig | None = None) -> CanaryAuditResult:
    """Runs the one-run canary audit of one private round and computes the epsilon lower bound.

    Args:
        config: the audit (default CanaryAuditConfig(): m=1000 canaries, epsilon 2).

    Returns:
        CanaryAuditResult; `passed` is False when the lower bound exceeds the claimed epsilon.

    Raises:
        AuditError: bad config. DPError: the DP config cannot be calibrated.
    """
    config = config or CanaryAuditConfig()
    started = time.perf_counter()
    m, (k_plus, k_minus) = config.canaries, config.guesses
    with _torch_threads(config.threads):
        gen = torch.Generator().manual_seed(config.seed)
        tokenizer = ByteTokenizer()
        profile = make_bank_profiles(1, seed=config.seed)[0]
        records = generate_bank_corpus(profile, config.records, seed=config.seed) if config.records else []
        L = config.seq_len
        markers_M = tokenizer.vocab_size + torch.arange(m)  # ids no record can contain
        tokens_ML = markers_M[:, None].expand(m, L + 1).contiguous()  # canary i: its marker, L+1 times
        included_M = torch.rand(m, generator=gen) < 0.5  # S_i: each canary in with probability 1/2

        parts_in, parts_tg, unit_ids = [], [], []
        if records:
            packed = pack_records(
                records,
                encode=tokenizer.encode,
                seq_len=L,
                eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id,
                privacy_unit="record",
            )
            parts_in.append(packed.inputs)
            parts_tg.append(packed.targets)
            unit_ids += list(packed.unit_ids)
        parts_in.append(tokens_ML[included_M, :-1])
        parts_tg.append(tokens_ML[included_M, 1:])
        unit_ids += [f"canary-{i}" for i in torch.nonzero(included_M).flatten().tolist()]
        data = _Units(torch.cat(parts_in).contiguous(), torch.cat(parts_tg).contiguous(), unit_ids)

        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(config.seed)
            model = DeepseekForCausalLM(preset("tiny", vocab_size=max(320, tokenizer.vocab_size + m)))
        configure_trainable(model, "full")
        weight = model.model.embed_tokens.weight
        directions = _canary_directions(model, tokens_ML, markers_M)
        rows_before = weight.detach()[markers_M].double().clone()

        cfg = config.dp_config()
        n = len(unit_ids)
        if config.noise_multiplier_override is None:
            report = train_private_round(model, data, cfg, AccountantState.fresh(cfg), seed=config.seed)
            sigma, q, claimed = report.sigma, report.q, report.epsilon_total
        else:
            # FAULT INJECTION (the audit's own test): the trainer's DP step loop at a forced sigma,
            # which `train_private_round` never allows (it calibrates sigma from the budget).
            sigma, q, claimed = config.noise_multiplier_override, sample_rate_for(cfg, n), config.target_epsilon
            inputs, targets = check_data(data, cfg)
            run_dp_steps(model, inputs, targets, cfg, noise_multiplier=sigma, sample_rate=q, seed=config.seed)
            logger.warning("canary audit: FAULT INJECTED, trained with noise_multiplier=%g", sigma)
        scores = ((rows_before - weight.detach()[markers_M].double()) * directions).sum(dim=1)

    included = included_M.numpy()
    r, v = count_guesses(scores.numpy(), included, k_plus=k_plus, k_minus=k_minus, seed=config.seed + 7)
    bound = epsilon_lower_bound(m=m, r=r, v=v, delta=config.delta, confidence=config.confidence)
    result = CanaryAuditResult(
        canaries=m,
        in_canaries=int(included.sum()),
        k_plus=k_plus,
        k_minus=k_minus,
        guesses=r,
        correct=v,
        confidence=config.confidence,
        delta=config.delta,
        epsilon_lower_bound=bound,
        claimed_epsilon=float(claimed),
        p_value_at_claim=p_value(m=m, r=r, v=v, epsilon=float(claimed), delta=config.delta),
        noise_multiplier=float(sigma),
        sample_rate=float(q),
        steps=cfg.local_steps,
        n_samples=n,
        fault_injected=config.noise_multiplier_override is not None,
        seconds=time.perf_counter() - started,
        # a perfect attacker: every guess right. Above this, the audit cannot refute a claim.
        max_certifiable_epsilon=epsilon_lower_bound(
            m=m, r=k_plus + k_minus, v=k_plus + k_minus, delta=config.delta, confidence=config.confidence
        ),
    )
    logger.info("canary audit: %s", result.summary())
    return result
