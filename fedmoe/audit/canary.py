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

What we audit (issue 26): a *claim* -- a mechanism (sigma, q, steps), e.g. a ledger entry's, said to
be (epsilon, delta)-DP -- not the audit's own calibration. `fedmoe-audit --empirical LEDGER` takes
the first bank ledger's first trained round (its history is that round alone) and its recorded
epsilon. Every run goes through the production noise path: `run_dp_steps(seed=None)`, Poisson
batches and Gaussian noise from the OS CSPRNG; the seed only draws which canaries go in (and
breaks ties), so inclusion and training randomness are independent.

Verdicts. FAIL: the lower bound exceeds the claim. Otherwise the claim survived, which alone
proves little (the one-run bound is weak), so the audit runs positive controls: the same q and
steps at the sigma whose true epsilon is 2x, 4x, ... 32x the claim, then without noise, until one
is refuted. PASS only when the first (2x) was: the audit would have caught an understatement of
that size. Else INCONCLUSIVE, naming the smallest true epsilon at which it refuted the claim.
Measured at m = 1000 (claim epsilon 2, q 0.107, 30 steps; tiny model): sigma 0 FAIL (bound 4.39);
sigma 0.3 / 0.5 / 0.75 (true epsilon ~60 / 19 / 8) INCONCLUSIVE (bounds 0.88 / 0.56 / 0.30; no
control refuted the claim short of sigma 0); a true claim (sigma 1.58) INCONCLUSIVE (bound 0).

The score (white-box canaries through the real DP-SGD path). The paper allows black-box
(input canaries, loss scores) and white-box auditors (gradient canaries, parameter access);
any score computed from the trained model is valid. Ours:
    - the bank's data: a synthetic bank corpus (fedmoe.fl_client.data), one record per sample;
    - canary i: a record made of one marker token t_i repeated, where t_i is an id no record and
      no other canary uses (byte tokenizer ids end at 258; the tiny model's vocab is widened to
      hold m markers), so the embedding row t_i moves only when canary i is in a batch (plus noise);
    - training: the DP step loop of fedmoe.fl_client.dp (`run_dp_steps`) on
      `fedmoe.model.deepseek.preset("tiny")` in train mode "full" (every parameter, the embedding
      included) -- the real per-sample clipping, Poisson sampling and Gaussian noise;
    - score_i = < E0[t_i] - E_T[t_i], u_i >, u_i the unit gradient of canary i's loss w.r.t. that
      row at the initial model: how far the row moved down canary i's own gradient. With SGD
      and no weight decay an absent canary's row moves by noise alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from opacus.accountants.utils import get_noise_multiplier
from scipy import stats

from fedmoe.fl_client.data import generate_bank_corpus, make_bank_profiles, pack_records
from fedmoe.fl_client.dp import DPConfig, DPError, sample_rate_for
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
    """One canary audit of a claim: mechanism (sigma, q, steps) claimed to be (epsilon, delta)-DP.

    Attributes:
        canaries: m.
        target_epsilon, delta: the claim under audit (a ledger entry's epsilon for its round).
        noise_multiplier: the mechanism's sigma (a ledger entry's); None: the sigma the accountant
            calibrates for the claim (a true claim).
        sample_rate: the mechanism's q; None: the audit's own (expected batch / its n).
        k_plus, k_minus: "in" / "out" guesses (None: m // 4 and 0). Fixed before the run (no
            search over k, which would need a multiple-testing correction).
        confidence: of the lower bound.
        records: the bank's own records beside the canaries.
        seq_len: tokens per training sample.
        training: the audited DP-SGD round (clip norm, steps, batch, optimizer, accountant...),
            with target_epsilon and delta put in by `dp_config` (default CANARY_ROUND).
        control_factors: positive controls, run when the claim survives: mechanisms whose true epsilon
            is factor x the claim (then one without noise); a PASS needs the first one refuted.
        seed: canary inclusion and tie breaks only; batch sampling and noise always come from the
            production CSPRNG path (`run_dp_steps(seed=None)`), independent of it.
        noise_multiplier_override: FAULT INJECTION (the CLI's --inject-no-noise): train at this sigma
            whatever the claim's, and mark the result as fault-injected.
        threads: torch intra-op threads during the run (1 is fastest for the tiny model; restored).
    """

    canaries: int = 1000
    target_epsilon: float = 2.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    k_plus: int | None = None
    k_minus: int | None = None
    confidence: float = 0.95
    records: int = 100
    seq_len: int = 8
    training: DPConfig = CANARY_ROUND
    control_factors: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 32.0)
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
        for name in ("noise_multiplier_override", "noise_multiplier"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise AuditError(f"CanaryAuditConfig.{name}: expected None or >= 0, got {value}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise AuditError(f"CanaryAuditConfig.sample_rate: expected None or in (0, 1], got {self.sample_rate}")
        if not self.control_factors or any(not f > 1 for f in self.control_factors):
            raise AuditError(f"CanaryAuditConfig.control_factors: expected factors > 1, got {self.control_factors}")

    @property
    def guesses(self) -> tuple[int, int]:
        k_plus = self.canaries // 4 if self.k_plus is None else self.k_plus
        return k_plus, 0 if self.k_minus is None else self.k_minus

    @property
    def audited_sigma(self) -> float | None:
        if self.noise_multiplier_override is not None:  # fault injection wins over the claim's sigma
            return self.noise_multiplier_override
        return self.noise_multiplier

    def dp_config(self) -> DPConfig:
        return dataclasses.replace(self.training, target_epsilon=self.target_epsilon, delta=self.delta)


@dataclass(frozen=True)
class CanaryAuditResult:
    """The outcome: the empirical epsilon lower bound next to the claim, and the audit's power.

    Verdicts: FAIL when the lower bound exceeds the claim (the mechanism leaks more than claimed);
    PASS only when it does not *and* the first positive control (a mechanism whose true epsilon is
    `control_factor` x the claim, same q and steps) was refuted, i.e. this audit would have caught
    an understatement of that size; INCONCLUSIVE otherwise, with `smallest_refutable`: the smallest
    true epsilon among the controls at which a violation of the claim was detected (inf: only a run
    without noise, or none).
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
    controls: tuple[tuple[float, float, float], ...] = ()  # (true epsilon, sigma, lower bound), in order run
    control_factor: float = 2.0

    @property
    def testable(self) -> bool:
        return self.claimed_epsilon < self.max_certifiable_epsilon

    @property
    def refuted(self) -> bool:
        return self.epsilon_lower_bound > self.claimed_epsilon

    @property
    def power_adequate(self) -> bool:
        return bool(self.controls) and self.controls[0][2] > self.claimed_epsilon

    @property
    def smallest_refutable(self) -> float:
        detected = [eps for eps, _, bound in self.controls if bound > self.claimed_epsilon]
        return detected[0] if detected else math.inf

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    @property
    def verdict(self) -> str:
        if self.refuted:
            return "FAIL"
        return "PASS" if self.testable and self.power_adequate else "INCONCLUSIVE"

    def to_dict(self) -> dict[str, Any]:
        extra = {"refuted": self.refuted, "power_adequate": self.power_adequate}
        smallest = self.smallest_refutable
        extra["smallest_refutable"] = None if math.isinf(smallest) else smallest
        return {**asdict(self), **extra, "passed": self.passed, "testable": self.testable, "verdict": self.verdict}

    def summary(self) -> str:
        verdict = self.verdict
        if verdict == "INCONCLUSIVE":
            smallest = self.smallest_refutable
            could = "nothing short of a run without noise" if math.isinf(smallest) else f"epsilon {smallest:.3g}"
            verdict += (
                f" (no power: a mechanism at {self.control_factor:g}x the claim was not caught; the smallest true "
                f"epsilon it refuted the claim at: {could}; m={self.canaries} canaries certify at most "
                f"{self.max_certifiable_epsilon:.2f})"
            )
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


@dataclass(frozen=True)
class _Setup:
    """What every run of one audit shares: the bank's packed records and the canaries."""

    records_in: torch.Tensor  # (n_records, L)
    records_tg: torch.Tensor
    record_ids: list[str]
    markers_M: torch.Tensor  # (m,) token ids no record contains
    tokens_ML: torch.Tensor  # (m, L + 1): canary i is its marker repeated
    vocab_size: int


def _setup(config: CanaryAuditConfig) -> _Setup:
    tokenizer = ByteTokenizer()
    profile = make_bank_profiles(1, seed=config.seed)[0]
    records = generate_bank_corpus(profile, config.records, seed=config.seed) if config.records else []
    L, m = config.seq_len, config.canaries
    markers_M = tokenizer.vocab_size + torch.arange(m)
    tokens_ML = markers_M[:, None].expand(m, L + 1).contiguous()
    empty = torch.empty(0, L, dtype=torch.long)
    rec_in, rec_tg, ids = empty, empty, []
    if records:
        packed = pack_records(records, encode=tokenizer.encode, seq_len=L, eos_id=tokenizer.eos_id,
                              pad_id=tokenizer.pad_id, privacy_unit="record")  # fmt: skip
        rec_in, rec_tg, ids = packed.inputs, packed.targets, list(packed.unit_ids)
    return _Setup(rec_in, rec_tg, ids, markers_M, tokens_ML, max(320, tokenizer.vocab_size + m))


def _one_run(config: CanaryAuditConfig, setup: _Setup, *, sigma: float, q: float | None, run: int) -> dict:
    """One private round on fresh canaries: inclusion from its own seeded generator, sampling and
    noise from the production CSPRNG path (`run_dp_steps(seed=None)`), then score and count."""
    m, (k_plus, k_minus) = config.canaries, config.guesses
    included = np.random.default_rng([config.seed, run]).random(m) < 0.5  # S_i, independent of training
    mask = torch.from_numpy(included)
    inputs = torch.cat([setup.records_in, setup.tokens_ML[mask, :-1]]).contiguous()
    targets = torch.cat([setup.records_tg, setup.tokens_ML[mask, 1:]]).contiguous()
    ids = setup.record_ids + [f"canary-{i}" for i in np.flatnonzero(included)]
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(config.seed)
        model = DeepseekForCausalLM(preset("tiny", vocab_size=setup.vocab_size))
    configure_trainable(model, "full")
    weight = model.model.embed_tokens.weight
    directions = _canary_directions(model, setup.tokens_ML, setup.markers_M)
    rows_before = weight.detach()[setup.markers_M].double().clone()
    cfg = config.dp_config()
    q = sample_rate_for(cfg, len(ids)) if q is None else q
    inputs, targets = check_data(_Units(inputs, targets, ids), cfg)
    run_dp_steps(model, inputs, targets, cfg, noise_multiplier=sigma, sample_rate=q, seed=None)
    scores = ((rows_before - weight.detach()[setup.markers_M].double()) * directions).sum(dim=1)
    r, v = count_guesses(scores.numpy(), included, k_plus=k_plus, k_minus=k_minus, seed=config.seed + 7 + run)
    bound = epsilon_lower_bound(m=m, r=r, v=v, delta=config.delta, confidence=config.confidence)
    return {"r": r, "v": v, "in": int(included.sum()), "n": len(ids), "q": q, "bound": bound}


@functools.lru_cache(maxsize=256)
def _sigma_for(epsilon: float, delta: float, q: float, steps: int) -> float:
    """sigma whose (q, steps) Poisson-subsampled Gaussian spends `epsilon` at `delta` (PRV; RDP if PRV fails)."""
    for accountant in ("prv", "rdp"):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore")
                sigma = get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=q,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=0.01,
                )
                return float(sigma)
        except (ValueError, RuntimeError, ArithmeticError):
            continue
    return 0.0


def _controls(config: CanaryAuditConfig, setup: _Setup, q: float) -> tuple[tuple[float, float, float], ...]:
    """Positive controls at factor x the claim (then without noise), until one refutes the claim."""
    steps, claim, out = config.training.local_steps, config.target_epsilon, []
    plan = [(f * claim, _sigma_for(f * claim, config.delta, q, steps)) for f in config.control_factors]
    for run, (eps, sigma) in enumerate([*plan, (math.inf, 0.0)], start=1):
        bound = _one_run(config, setup, sigma=sigma, q=q, run=run)["bound"]
        out.append((eps, sigma, bound))
        logger.info("canary audit control: true epsilon %.3g (sigma %.4g): lower bound %.3f", eps, sigma, bound)
        if bound > claim:
            break
    return tuple(out)


def run_canary_audit(config: CanaryAuditConfig | None = None) -> CanaryAuditResult:
    """Audits a claim: the mechanism (sigma, q, steps) through the production noise path, m canaries.

    The claim survives when the empirical lower bound stays at or below it; it PASSes only when a
    positive control (true epsilon = control_factors[0] x the claim) was refuted by the same audit.

    Raises:
        AuditError: bad config. DPError: the DP config cannot be calibrated.
    """
    config = config or CanaryAuditConfig()
    started = time.perf_counter()
    m, (k_plus, k_minus) = config.canaries, config.guesses
    claim, steps = config.target_epsilon, config.training.local_steps
    certifiable = epsilon_lower_bound(m=m, r=k_plus + k_minus, v=k_plus + k_minus, delta=config.delta,
                                      confidence=config.confidence)  # fmt: skip
    with _torch_threads(config.threads):
        setup = _setup(config)
        n_expected = len(setup.record_ids) + m // 2
        q = config.sample_rate or min(1.0, config.training.expected_batch_size / n_expected)
        sigma = config.audited_sigma
        sigma = _sigma_for(claim, config.delta, q, steps) if sigma is None else sigma
        main = _one_run(config, setup, sigma=sigma, q=q, run=0)
        survived = main["bound"] <= claim
        controls = _controls(config, setup, q) if survived and claim < certifiable else ()
    result = CanaryAuditResult(
        canaries=m, in_canaries=main["in"], k_plus=k_plus, k_minus=k_minus, guesses=main["r"], correct=main["v"],
        confidence=config.confidence, delta=config.delta, epsilon_lower_bound=main["bound"], claimed_epsilon=claim,
        p_value_at_claim=p_value(m=m, r=main["r"], v=main["v"], epsilon=claim, delta=config.delta),
        noise_multiplier=float(sigma), sample_rate=float(q), steps=steps, n_samples=main["n"],
        fault_injected=config.noise_multiplier_override is not None, seconds=time.perf_counter() - started,
        max_certifiable_epsilon=certifiable, controls=controls, control_factor=config.control_factors[0],
    )  # fmt: skip
    logger.info("canary audit: %s", result.summary())
    return result


def claim_from_ledgers(paths: list) -> dict[str, Any] | None:
    """The first single-round claim in the bank ledgers given: (sigma, q, steps) and the epsilon the
    bank recorded for it (its first trained round, whose history is that round alone), or None."""
    from fedmoe.protocol.ledger import BANK_SCHEMA, read_verified

    for path in paths:
        _, entries = read_verified(path)
        for entry in entries:
            if entry.get("schema") == BANK_SCHEMA and entry.get("status") == "trained" and len(entry["history"]) == 1:
                sigma, q, steps = entry["history"][0]
                return {"noise_multiplier": float(sigma), "sample_rate": float(q), "steps": int(steps),
                        "target_epsilon": float(entry["epsilon"]), "delta": float(entry["delta"]),
                        "source": f"{path} round {entry['round']}"}  # fmt: skip
    return None
