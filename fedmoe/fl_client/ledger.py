"""The bank's side of the privacy ledger: turning a private round into a typed ledger entry.

The format itself (hash chain, `BankEntry`, mirror lines, file lock) is `fedmoe.protocol.ledger`,
shared with the server and the audit; this module only knows how a bank fills an entry from its
DP accountant and round report, and how it reads its accountant back from its ledger.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
from collections.abc import Mapping, Sequence
from typing import Any

from fedmoe.fl_client.dp.accountant import AccountantState, HistoryEntry, epsilon_for_history
from fedmoe.fl_client.dp.config import DPConfig
from fedmoe.fl_client.dp.errors import DPError
from fedmoe.fl_client.dp.trainer import RoundPrivacyReport
from fedmoe.protocol.accounting import epsilon_pld
from fedmoe.protocol.ledger import BANK_SCHEMA, ROUND_STATUSES, BankEntry, LedgerError, RoundStatus

# Packages whose versions go into every entry (distribution names).
VERSIONED_PACKAGES: dict[str, str] = {
    "torch": "torch",
    "opacus": "opacus",
    "dp_accounting": "dp-accounting",
    "flwr": "flwr",
    "tenseal": "tenseal",
    "fedmoe": "fedmoe",
}
logger = logging.getLogger(__name__)


def library_versions() -> dict[str, str]:
    """Versions of python and the packages privacy depends on ("absent" if not installed)."""
    out = {"python": platform.python_version()}
    for key, dist in VERSIONED_PACKAGES.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = "absent"
    return out


def next_round_epsilon(state: AccountantState, planned: HistoryEntry) -> float:
    """The epsilon the bank would reach after one more round `planned`: the larger of its own
    accountant's (add/remove) and replace-one's, the two its budget check enforces."""
    return max(state.epsilon_after(planned))


def _history_list(history: Sequence[Sequence[float]]) -> list[list[float | int]]:
    return [[float(s), float(q), int(n)] for s, q, n in history]


def round_entry(
    *,
    job_id: str,
    bank_id: str,
    round: int,
    status: RoundStatus,
    report: RoundPrivacyReport | None,
    cfg: DPConfig,
    n_samples: int,
    budget_epsilon: float,
    epsilon_next_round: float | None = None,
    reason: str = "",
    state: AccountantState | None = None,
    planned: HistoryEntry | None = None,
    started_at: str | None = None,
    noise_source: str = "csprng",
    dataset_fingerprint: str = "",
    dataset_id: str = "",
    customer_ids: bool = False,
    policy_hash: str = "",
    policy_overrides: Mapping[str, float] | None = None,
    requested: Mapping[str, object] | None = None,
    released_metrics: Sequence[str] = (),
) -> dict[str, Any]:
    """A bank's ledger entry for one round, every field the audit re-derives epsilon from.

    Args:
        job_id, bank_id, round: which round of which job at which bank.
        status: "trained" (needs `report`), or "refused" / "skipped" / "dropped" (no report;
            nothing is spent: pass the bank's unchanged accountant `state` so the entry carries
            its history and current epsilon).
        report: the `RoundPrivacyReport` of `train_private_round` for a trained round.
        cfg: the bank's DP config (clip norm, batch, privacy unit, secure mode, accountant).
        n_samples: privacy units in the bank's training set.
        budget_epsilon: the bank's budget (normally cfg.target_epsilon).
        epsilon_next_round: the epsilon one more identical round would reach (what the server's
            `bank_exhausted` reads). None: computed here by the bank's accountant from the
            report (trained) or from `state` + `planned` (refused); left None otherwise.
        reason: free text, e.g. the BudgetExceeded message of a refusal.
        state: the accountant state before this round (required unless status is "trained").
        planned: for a refusal, the entry the round would have added (`planned_round`).
        started_at: when the round started (ISO 8601 UTC); `Ledger.append` adds `written_at`.
        noise_source: "csprng", "seeded" (the bank's policy allowed predictable noise) or "none"
            (a non-private round).
        dataset_fingerprint: the set of records this round saw (order-, duplicate- and unit-free).
        dataset_id: the dataset identity this ledger's lifetime budget belongs to.
        customer_ids: the data has a customer_id column (record-level DP on it only by an explicit policy line).
        policy_hash, policy_overrides: the bank's policy in force (its content hash) and the node-config
            values applied over it; the audit checks the entry against that policy file.
        requested: what the job asked for (run-config names); `cfg` holds the bank's own values.
        released_metrics: the plain metrics (train-loss, eval-loss) the bank's replies carry, by its policy.

    Returns:
        A JSON-ready dict (a `BankEntry`, schema BANK_SCHEMA) for `Ledger.append`.

    Raises:
        LedgerError: unknown status, a report for a round that did not train (or none for one
            that did), or report/config/state that disagree on bank, accountant or delta.
    """
    where = f"ledger entry for bank {bank_id!r} round {round}"
    if status not in ROUND_STATUSES:
        raise LedgerError(f"{where}: status expected one of {list(ROUND_STATUSES)}, got {status!r}")
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise LedgerError(f"{where}: round expected an integer >= 0, got {round!r}")
    if cfg.bank_id != bank_id:
        raise LedgerError(f"{where}: DPConfig.bank_id expected {bank_id!r}, got {cfg.bank_id!r}")
    if (status == "trained") != (report is not None):
        raise LedgerError(
            f"{where}: status {status!r} expected {'a' if status == 'trained' else 'no'} RoundPrivacyReport, "
            f"got {'one' if report is not None else 'None'}"
        )
    if report is not None:
        for name, mine, theirs in (
            ("bank_id", report.bank_id, bank_id),
            ("accountant", report.accountant, cfg.accountant),
            ("delta", report.delta, cfg.delta),
            ("n_samples", report.n_samples, n_samples),
        ):
            if mine != theirs:
                raise LedgerError(f"{where}: report.{name} expected {theirs!r}, got {mine!r}")
        history, account = report.history, report.accountant_state
        this = HistoryEntry(report.sigma, report.q, report.steps)
        epsilon, epsilon_before = report.epsilon_total, report.epsilon_before
        if epsilon_next_round is None:
            epsilon_next_round = next_round_epsilon(report.accountant_state, this)
    else:
        if state is None:
            raise LedgerError(f"{where}: status {status!r} needs the bank's unchanged accountant state, got None")
        try:
            state.check_matches(cfg)
        except DPError as err:
            raise LedgerError(f"{where}: {err}") from None
        history, account = state.history, state
        this = planned
        epsilon = epsilon_before = state.epsilon()
        if epsilon_next_round is None and planned is not None:
            epsilon_next_round = next_round_epsilon(state, planned)
    eps_prv: float | None = epsilon
    if cfg.accountant != "prv":
        try:  # a secondary number for an RDP bank: never fail the round over it
            eps_prv = epsilon_for_history(history, delta=cfg.delta, mechanism="prv")
        except (ValueError, ArithmeticError, RuntimeError) as err:
            logger.warning("%s: PRV epsilon not computed (%s); recording null", where, err)
            eps_prv = None
    try:  # the n-dependent noise level makes replace-one the adjacency that counts once n is known
        eps_replace: float | None = account.epsilon_replace_one()  # (memoized: the budget check asked)
    except (ValueError, ArithmeticError, RuntimeError) as err:
        logger.warning("%s: replace-one epsilon not computed (%s); recording null", where, err)
        eps_replace = None
    return BankEntry(
        schema=BANK_SCHEMA,
        job_id=job_id,
        bank_id=bank_id,
        round=round,
        status=status,
        reason=reason,
        started_at=started_at,
        # the mechanism of this round (planned for a refusal; None when unknown)
        noise_multiplier=None if this is None else float(this.noise_multiplier),
        sample_rate=None if this is None else float(this.sample_rate),
        local_steps=None if this is None else int(this.steps),
        steps_run=int(report.steps) if report is not None else 0,
        clip_norm=float(cfg.clip_norm),
        expected_batch_size=int(cfg.expected_batch_size),
        n_samples=int(n_samples),
        privacy_unit=cfg.privacy_unit,
        # fedmoe.fl_client.dp always samples each step's batch by Poisson(q) (PoissonBatchSampler),
        # what the subsampled-Gaussian accountants assume.
        poisson_sampling=True,
        secure_mode=bool(cfg.secure_mode),
        noise_source=noise_source,
        dataset_fingerprint=dataset_fingerprint,
        dataset_id=dataset_id,
        customer_ids=bool(customer_ids),
        policy_hash=policy_hash,
        policy_overrides=dict(policy_overrides or {}),
        requested=dict(requested or {}),
        released_metrics=sorted(released_metrics),
        grad_sample_mode=cfg.grad_sample_mode,
        # accounting, at the bank's delta
        accountant=cfg.accountant,
        delta=float(cfg.delta),
        history=_history_list(history),
        epsilon=float(epsilon),
        epsilon_before=float(epsilon_before),
        epsilon_spent_this_round=float(epsilon - epsilon_before),
        epsilon_prv=None if eps_prv is None else float(eps_prv),
        epsilon_pld=epsilon_pld(history, delta=cfg.delta),
        epsilon_replace_one=eps_replace,
        epsilon_next_round=None if epsilon_next_round is None else float(epsilon_next_round),
        budget_epsilon=float(budget_epsilon),
        versions=library_versions(),
    ).to_dict()


def accountant_state_from_ledger(entries: Sequence[Mapping[str, Any]], cfg: DPConfig) -> AccountantState | None:
    """The accountant state the bank's ledger implies (its last entry's history), or None if empty.

    The ledger is appended *before* accountant.json is saved, so after a crash between the two
    the ledger is the longer (and right) one: load the bank's state from here when they differ.
    The history is evaluated at `cfg`'s accountant and delta (a later job may use another delta:
    the same history then has another epsilon, and the budget check uses that one).
    """
    if not entries:
        return None
    history = tuple(HistoryEntry(float(s), float(q), int(n)) for s, q, n in entries[-1]["history"])
    return AccountantState(mechanism=cfg.accountant, delta=float(cfg.delta), history=history)
