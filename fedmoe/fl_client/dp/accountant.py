"""Privacy accounting for one bank: history entries, JSON state, calibration, the budget check.

A bank's privacy loss is the composition of every DP-SGD step it ran, over the rounds it took
part in. One round = `steps` Poisson-subsampled Gaussian mechanisms with noise multiplier sigma
and sampling rate q (Abadi et al., 2016), recorded as one history entry (sigma, q, steps) in the
shape of Opacus' accountant history. Epsilon for a history comes from Opacus' accountants: PRV
(Gopi et al., 2021; default) or RDP (Mironov, 2017; Mironov et al., 2019). Rounds a bank skipped
add nothing; the server's aggregation is post-processing of the released noised updates.

Everything here is a pure function of plain numbers, so a ledger can re-verify a bank's claim.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedmoe.fl_client.dp.config import ACCOUNTANTS, DPConfig
from fedmoe.fl_client.dp.errors import BudgetExceeded, DPError
from fedmoe.protocol.accounting import PRV_EPS_ERROR, epsilon_replace_one
from fedmoe.protocol.files import atomic_write_bytes

STATE_VERSION = 1
# Calibration stops when the plan's epsilon is within this of the target (always at or below it).
CALIBRATION_TOLERANCE = 0.01


class HistoryEntry(NamedTuple):
    """One round of DP-SGD: `steps` Poisson-subsampled Gaussian steps at (noise_multiplier, sample_rate)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def _merged(history: tuple[HistoryEntry, ...] | list[HistoryEntry]) -> list[tuple[float, float, int]]:
    """Consecutive entries with equal (sigma, q) joined, as Opacus' accountants store them.

    k rounds of (sigma, q, s) are the same mechanism as (sigma, q, k*s); joining keeps the
    accounting of a finished plan bit-identical to its calibration.
    """
    out: list[tuple[float, float, int]] = []
    for sigma, q, steps in history:
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((float(sigma), float(q), int(steps)))
    return out


def epsilon_for_history(
    history: tuple[HistoryEntry, ...] | list[HistoryEntry], *, delta: float, mechanism: str = "prv"
) -> float:
    """Epsilon spent by a history of DP-SGD rounds at `delta`, by Opacus' PRV or RDP accountant.

    Args:
        history: entries (noise_multiplier, sample_rate, steps), oldest first.
        delta: the bank's delta.
        mechanism: "prv" or "rdp".

    Returns:
        Epsilon (0.0 for an empty history).

    Raises:
        DPError: unknown mechanism.
    """
    if mechanism not in ACCOUNTANTS:
        raise DPError(f"accountant: expected one of {list(ACCOUNTANTS)}, got {mechanism!r}")
    merged = _merged(history)
    if not merged or all(steps == 0 for _, _, steps in merged):
        return 0.0
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = merged
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if mechanism == "prv":
            return float(accountant.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
        return float(accountant.get_epsilon(delta=delta))


def sample_rate_for(cfg: DPConfig, n_samples: int) -> float:
    """Poisson sampling rate q = expected_batch_size / n_samples.

    Raises:
        DPError: no samples, or fewer samples than the expected batch (q would exceed 1).
    """
    if n_samples < 1 or cfg.expected_batch_size > n_samples:
        raise DPError(
            f"bank {cfg.bank_id!r}: expected_batch_size={cfg.expected_batch_size} needs at least that many "
            f"samples ({cfg.privacy_unit} units), got {n_samples}"
        )
    return cfg.expected_batch_size / n_samples


@functools.lru_cache(maxsize=64)
def noise_multiplier_for(cfg: DPConfig, n_samples: int) -> float:
    """Noise multiplier sigma so that `planned_rounds * local_steps` steps at q spend target_epsilon.

    Opacus' binary search over sigma (`get_noise_multiplier`), raised where needed so that the
    plan also meets target_epsilon under replace-one adjacency (`_meeting_replace_one`): the
    larger of the plan's two epsilons is at most target_epsilon and within CALIBRATION_TOLERANCE
    of it. A pure function of its arguments (cached: a PRV search takes about a second).

    Args:
        cfg: the bank's DP config (budget, plan, batch, accountant).
        n_samples: privacy units in the bank's training set.

    Returns:
        sigma (noise std = sigma * clip_norm on the summed clipped gradients).

    Raises:
        DPError: q > 1, or a budget too small for any sigma Opacus searches.
    """
    q = sample_rate_for(cfg, n_samples)
    kwargs: dict[str, Any] = {"eps_error": PRV_EPS_ERROR} if cfg.accountant == "prv" else {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=cfg.target_epsilon,
                    target_delta=cfg.delta,
                    sample_rate=q,
                    steps=cfg.total_planned_steps,
                    accountant=cfg.accountant,
                    epsilon_tolerance=CALIBRATION_TOLERANCE,
                    **kwargs,
                )
            )
    except ValueError as err:
        raise DPError(
            f"bank {cfg.bank_id!r}: cannot calibrate noise for target_epsilon={cfg.target_epsilon}, "
            f"delta={cfg.delta}, q={q:.4g}, steps={cfg.total_planned_steps}: {err}"
        ) from None
    return _meeting_replace_one(cfg, q, sigma)


def _meeting_replace_one(cfg: DPConfig, q: float, sigma: float) -> float:
    """The smallest sigma >= `sigma` (to CALIBRATION_TOLERANCE) whose plan also meets the budget
    under replace-one adjacency.

    Why: sigma comes from q = B/n, so the noise level of a bank's update depends on n; a bank's
    guarantee must therefore hold with n public (issue 26). Epsilon falls smoothly with sigma, so
    false position on a bracket (Illinois variant) needs ~4-6 PLD evaluations (~0.1-0.3 s each).
    """
    steps, target = cfg.total_planned_steps, cfg.target_epsilon

    def excess(s: float) -> float:  # > 0: the plan at s passes the budget under replace-one
        return epsilon_replace_one([(s, q, steps)], delta=cfg.delta) - target

    if excess(sigma) <= 0:
        return sigma
    low, f_low = sigma, excess(sigma)
    high, f_high = 2.0 * sigma, excess(2.0 * sigma)
    while f_high > 0:
        low, f_low, high = high, f_high, 2.0 * high
        if high > 1e4:
            raise DPError(f"bank {cfg.bank_id!r}: no sigma meets target_epsilon={cfg.target_epsilon} under replace-one")
        f_high = excess(high)
    side = 0
    for _ in range(60):
        if -f_high <= CALIBRATION_TOLERANCE or high - low <= 1e-9 * high:
            break
        mid = high - f_high * (high - low) / (f_high - f_low)
        f_mid = excess(mid)
        if f_mid > 0:
            low, f_low = mid, f_mid
            f_high, side = (f_high / 2, side) if side == -1 else (f_high, -1)
        else:
            high, f_high = mid, f_mid
            f_low, side = (f_low / 2, side) if side == 1 else (f_low, 1)
    return high


@dataclass(frozen=True)
class DPPlan:
    """What the accountant calibrated for a bank's job: the batch sizing of DP-SGD in one record.

    Attributes:
        expected_batch: B, the job's batch-size (Poisson: each sample joins a step with q = B / n).
        sample_rate: q.
        steps: planned rounds x local steps, the steps sigma is calibrated for.
        sigma: the noise multiplier that spends target_epsilon over `steps`.
        noise_per_coordinate: sigma x C / B, the std of the noise on each coordinate of a step's
            mean clipped gradient (what a larger batch buys: sigma grows far slower than B).
        epsilon: what the full plan spends by the bank's accountant (add/remove, <= target_epsilon).
        epsilon_replace_one: the same under replace-one adjacency (n public; <= target_epsilon).
    """

    expected_batch: int
    sample_rate: float
    steps: int
    sigma: float
    noise_per_coordinate: float
    epsilon: float
    epsilon_replace_one: float


def plan_for(cfg: DPConfig, n_samples: int) -> DPPlan:
    """The calibrated plan of `cfg` on `n_samples` privacy units (a pure function, cached below).

    Raises:
        DPError: as `noise_multiplier_for` (q > 1, or a budget too small for any sigma).
    """
    sigma = noise_multiplier_for(cfg, n_samples)
    q = sample_rate_for(cfg, n_samples)
    steps = cfg.total_planned_steps
    epsilon = epsilon_for_history([HistoryEntry(sigma, q, steps)], delta=cfg.delta, mechanism=cfg.accountant)
    replace_one = epsilon_replace_one([(sigma, q, steps)], delta=cfg.delta)
    noise = sigma * cfg.clip_norm / cfg.expected_batch_size
    return DPPlan(cfg.expected_batch_size, q, steps, sigma, noise, epsilon, replace_one)


@dataclass(frozen=True)
class AccountantState:
    """What a bank must remember between rounds to account its privacy: plain, JSON-serializable.

    Attributes:
        mechanism: "prv" or "rdp" (fixed for the life of the state).
        delta: the bank's delta (fixed for the life of the state).
        history: one entry per round the bank trained in, oldest first.
    """

    mechanism: str
    delta: float
    history: tuple[HistoryEntry, ...] = ()

    def __post_init__(self) -> None:
        if self.mechanism not in ACCOUNTANTS:
            raise DPError(f"AccountantState.mechanism: expected one of {list(ACCOUNTANTS)}, got {self.mechanism!r}")
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise DPError(f"AccountantState.delta: expected a float in (0, 1), got {self.delta!r}")
        object.__setattr__(self, "history", tuple(HistoryEntry(*e) for e in self.history))
        for i, (sigma, q, steps) in enumerate(self.history):
            if not (math.isfinite(sigma) and sigma > 0 and 0 < q <= 1 and isinstance(steps, int) and steps >= 0):
                raise DPError(
                    f"AccountantState.history[{i}]: expected (sigma > 0, 0 < q <= 1, int steps >= 0), "
                    f"got {tuple(self.history[i])!r}"
                )

    @classmethod
    def fresh(cls, cfg: DPConfig) -> AccountantState:
        """The state of a bank that has not trained yet."""
        return cls(mechanism=cfg.accountant, delta=float(cfg.delta))

    def rekeyed(self, cfg: DPConfig) -> AccountantState:
        """The same history evaluated at `cfg`'s accountant and delta.

        A dataset's privacy curve is one function of its history; a job may read it at its own
        delta. If every check passes at delta_job <= the policy's max delta, the lifetime
        guarantee holds at that max delta too (epsilon only falls as delta grows).
        """
        return AccountantState(mechanism=cfg.accountant, delta=float(cfg.delta), history=self.history)

    def epsilon(self) -> float:
        return _memo_epsilon(self.history, self.delta, self.mechanism)

    def epsilon_replace_one(self) -> float:
        """The same history under replace-one adjacency (n public; `epsilon_replace_one`)."""
        return _memo_replace_one(self.history, self.delta)

    def appended(self, entry: HistoryEntry) -> AccountantState:
        return AccountantState(self.mechanism, self.delta, (*self.history, HistoryEntry(*entry)))

    def epsilon_after(self, entry: HistoryEntry) -> tuple[float, float]:
        """(add/remove, replace-one) epsilon after one more round `entry`: the two a budget holds under."""
        after = self.appended(entry)
        return after.epsilon(), after.epsilon_replace_one()

    def check_matches(self, cfg: DPConfig) -> None:
        """Raises DPError if this state was built for another accountant or delta than `cfg`."""
        for field, mine, theirs in (("accountant", self.mechanism, cfg.accountant), ("delta", self.delta, cfg.delta)):
            if mine != theirs:
                raise DPError(
                    f"bank {cfg.bank_id!r}: accountant state has {field}={mine!r}, the DP config says {theirs!r}; "
                    "a bank's accountant and delta cannot change between rounds"
                )

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "mechanism": self.mechanism,
            "delta": self.delta,
            "history": [[e.noise_multiplier, e.sample_rate, e.steps] for e in self.history],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "accountant state") -> AccountantState:
        if not isinstance(raw, dict):
            raise DPError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("version") != STATE_VERSION:
            raise DPError(f"{source}: version expected {STATE_VERSION}, got {raw.get('version')!r}")
        for key in ("mechanism", "delta", "history"):
            if key not in raw:
                raise DPError(f"{source}: missing field {key!r}")
        history = raw["history"]
        if not isinstance(history, list):
            raise DPError(f"{source}: history expected a list, got {type(history).__name__}")
        entries = []
        for i, item in enumerate(history):
            ok = (
                isinstance(item, list)
                and len(item) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)
                and isinstance(item[2], int)
            )
            if not ok:
                raise DPError(f"{source}: history[{i}] expected [sigma, q, steps] numbers, got {item!r}")
            entries.append(HistoryEntry(float(item[0]), float(item[1]), int(item[2])))
        delta = raw["delta"]
        if isinstance(delta, bool) or not isinstance(delta, (int, float)):
            raise DPError(f"{source}: delta expected a number, got {delta!r}")
        try:
            return cls(mechanism=raw["mechanism"], delta=float(delta), history=tuple(entries))
        except DPError as err:
            raise DPError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "accountant state") -> AccountantState:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise DPError(f"{source}: invalid JSON at line {err.lineno}: {err.msg}") from None
        return cls.from_dict(raw, source=source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the state atomically (temp file, fsync, rename)."""
        return atomic_write_bytes(Path(path), (self.to_json() + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AccountantState:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DPError(f"{path}: accountant state file not found") from None
        return cls.from_json(text, source=str(path))


# A bank asks about the same history several times a round: its pre-flight (at the last round's
# unmask), its budget check and its ledger entry (each PRV or PLD evaluation ~0.1-0.6 s; before the
# memo they were most of a steady round's bank time, docs/performance.md). The memo sits here, not in
# the pure functions: mutation testing forks its mutants from a process that already ran the tests,
# and a memo inside a mutated function would answer with the unmutated value.
@functools.lru_cache(maxsize=256)
def _memo_epsilon(history: tuple[HistoryEntry, ...], delta: float, mechanism: str) -> float:
    return epsilon_for_history(history, delta=delta, mechanism=mechanism)


@functools.lru_cache(maxsize=256)
def _memo_replace_one(history: tuple[HistoryEntry, ...], delta: float) -> float:
    return epsilon_replace_one(history, delta=delta)


@dataclass(frozen=True)
class BudgetCheck:
    """The outcome of checking a planned round against a bank's budget."""

    entry: HistoryEntry
    epsilon_before: float
    epsilon_after: float


def check_budget(cfg: DPConfig, state: AccountantState, entry: HistoryEntry) -> BudgetCheck:
    """Epsilon before and after one more round; raises if the round would pass the budget.

    The budget holds under both adjacencies: add/remove by the bank's accountant, and replace-one
    (n public: the noise level depends on n, see `_meeting_replace_one`).

    Raises:
        DPError: the state does not match the config (accountant, delta).
        BudgetExceeded: epsilon after the round > cfg.target_epsilon, under either adjacency.
    """
    state.check_matches(cfg)
    before = state.epsilon()
    after, after_replace_one = state.epsilon_after(entry)
    if max(after, after_replace_one) > cfg.target_epsilon:
        raise BudgetExceeded(
            f"bank {cfg.bank_id!r}: the next round (sigma={entry.noise_multiplier:.4g}, q={entry.sample_rate:.4g}, "
            f"steps={entry.steps}) would bring epsilon to {after:.4f} (replace-one {after_replace_one:.4f}); budget "
            f"target_epsilon={cfg.target_epsilon} at delta={cfg.delta} ({cfg.accountant}); spent so far "
            f"{before:.4f} over {len(state.history)} round(s)"
        )
    return BudgetCheck(entry=entry, epsilon_before=before, epsilon_after=after)
