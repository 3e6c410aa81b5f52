"""Verifying ledgers: hash chains, entry contents, independent epsilon, mirror cross-checks.

`audit_ledgers(paths)` is pure (no printing): it reads bank ledgers and server mirror files,
and returns an `AuditResult` with one `Finding` per problem, each naming its file and line.

Checks, for every bank entry (in a bank ledger, or wrapped in a mirror line):
    chain       every line canonical, `seq` = line number, `prev_hash` = previous `hash`,
                `hash` = SHA-256 of the content (fedmoe.fl_client.ledger.verify_chain).
    schema      every field the ledger promises is there with its type.
    poisson     the entry says its batches were Poisson-sampled (the accountants assume it).
    history     a trained entry's history is the previous one plus this round's (sigma, q,
                steps); any other entry leaves it unchanged; q = expected batch / n.
    epsilon     epsilon recomputed from the recorded history, independently of the values
                written: PLD (dp_accounting) against `epsilon_pld`, `epsilon_prv`,
                `epsilon_before`, `epsilon_next_round` and the accountant's `epsilon`, PLD
                replace-one against `epsilon_replace_one`; for an "rdp" bank also RDP
                (dp_accounting's RdpAccountant, not Opacus). Tolerance 1%
                (+ PRV's documented eps_error of 0.01 for PRV values, which are upper bounds
                within that of the truth).
    budget      a trained entry's epsilon, add/remove and replace-one, is within the bank's budget.
    sequence    rounds in order (a round recorded twice -- re-run after an interruption, both
                spent -- is a warning); job, bank, accountant, delta constant.
    mirror      a mirror line's bank entry hashes correctly and names the same bank/round/job;
                mirrored entries chain to each other.
    cross-check every entry the server mirrored is in the bank's ledger with the same hash
                (catches a bank ledger whose last lines were deleted or replaced).
    missing-ledger  a mirror that shows a round the bank trained (received, or a commitment to a
                trained entry) without the bank's ledger; a mirror that shows none is an info
                `not-trained` (nothing of this job is the bank's to verify).

Each bank's budget is its policy's lifetime epsilon where the audit has its policy (`policies`);
without it, the largest `budget_epsilon` its ledger records (every entry's is at most the policy's).
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedmoe.audit.policy_check import (
    SPENDING_STATUSES,
    check_dataset_identities,
    check_entry_policy,
    load_policies,
)
from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import ConsortiumPins
from fedmoe.protocol.accounting import epsilon_pld, epsilon_rdp, epsilon_replace_one, epsilon_tolerance
from fedmoe.protocol.errors import ConfigError
from fedmoe.protocol.ledger import (
    BANK_SCHEMA,
    MIRROR_SCHEMA,
    NAMED_POISONER,
    ROUND_STATUSES,
    SERVER_STATUSES,
    ChainReport,
    LedgerError,
    bank_entry_fields,
    check_commitment,
    is_json_type,
    read_verified,
    signed_message,
)

if TYPE_CHECKING:
    from fedmoe.audit.canary import CanaryAuditResult

Severity = Literal["error", "warning", "info"]  # info: a note, not a failure
BudgetSource = Literal["policy", "ledger"]  # the bank's policy file, or the largest budget_epsilon its ledger records
# The bank entry schema, derived from the typed entry the bank's writer fills (fedmoe.protocol.ledger).
_BANK_FIELDS = bank_entry_fields()


@dataclass(frozen=True)
class Finding:
    """One failed (error) or suspicious (warning) check, located at a file and line."""

    severity: Severity
    check: str
    path: Path
    line: int | None
    message: str
    bank_id: str | None = None
    round: int | None = None

    @property
    def location(self) -> str:
        return f"{self.path}:{self.line}" if self.line else str(self.path)

    def __str__(self) -> str:
        return f"{self.severity}: {self.location}: [{self.check}] {self.message}"


@dataclass(frozen=True)
class LedgerFile:
    """One input file: its kind ("bank", "mirror" or "unknown") and its chain report."""

    path: Path
    kind: str
    chain: ChainReport
    bank_ids: tuple[str, ...] = ()
    job_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoundPoint:
    """A bank's state after one ledger entry, for tables and plots."""

    round: int
    status: str
    epsilon: float  # as recorded by the bank's accountant
    epsilon_pld: float  # recomputed here from the recorded history
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    source: str  # path:line


@dataclass(frozen=True)
class BankSummary:
    """One bank of one job, from its own ledger (the authority) or else the server's mirror."""

    job_id: str
    bank_id: str
    accountant: str
    delta: float
    budget: float
    authority: str  # the file the numbers come from
    points: tuple[RoundPoint, ...]
    rounds_trained: tuple[int, ...]
    rounds_refused: tuple[int, ...]
    rounds_skipped: tuple[int, ...]
    rounds_dropped: tuple[int, ...]
    epsilon_recorded: float
    epsilon_pld: float
    epsilon_rdp: float
    ok: bool
    entries: tuple[dict[str, Any], ...] = ()  # the bank's ledger entries of this job, verbatim
    head_hash: str = ""  # hash of the last entry of the bank's ledger file (what a sign-off pins)
    epsilon_replace_one: float = 0.0  # recomputed here (PLD, replace-one: n public)
    budget_source: BudgetSource = "ledger"

    @property
    def spent_in_job(self) -> bool:
        """Whether any round of this job spent privacy (trained, with or without DP)."""
        return any(p.status in SPENDING_STATUSES for p in self.points)

    @property
    def epsilon_spent(self) -> float:
        """What the bank has spent: the largest of the recorded, the recomputed (PLD) and the
        replace-one epsilon (its noise level depends on n, so its budget holds under both)."""
        return max(self.epsilon_recorded, self.epsilon_pld, self.epsilon_replace_one)

    @property
    def remaining(self) -> float:
        return self.budget - self.epsilon_spent


@dataclass(frozen=True)
class AuditResult:
    """Everything the audit found; `ok` when no check failed (warnings allowed)."""

    files: tuple[LedgerFile, ...]
    banks: tuple[BankSummary, ...]
    findings: tuple[Finding, ...]
    empirical: tuple[CanaryAuditResult, ...] = ()
    pins_checked: bool = False  # signatures were verified against pinned consortium keys

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors and all(e.passed for e in self.empirical)

    def with_empirical(self, *results: CanaryAuditResult) -> AuditResult:
        return replace(self, empirical=(*self.empirical, *results))


# ---------------------------------------------------------------------------------------------
# Recomputation (memoized: consecutive entries and repeated audits share histories)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _pld_cached(delta: float, history: tuple[tuple[float, float, int], ...]) -> float:
    return epsilon_pld(history, delta=delta)


@functools.lru_cache(maxsize=4096)
def _replace_one_cached(delta: float, history: tuple[tuple[float, float, int], ...]) -> float:
    return epsilon_replace_one(history, delta=delta)


@functools.lru_cache(maxsize=4096)
def _rdp_cached(delta: float, history: tuple[tuple[float, float, int], ...]) -> float:
    return epsilon_rdp(history, delta=delta)


class _Recompute:
    """Epsilon of recorded histories, memoized (pure functions of (history, delta))."""

    @staticmethod
    def _key(history: Sequence[Sequence[float]]) -> tuple[tuple[float, float, int], ...]:
        return tuple((float(s), float(q), int(n)) for s, q, n in history)

    def pld(self, history: Sequence[Sequence[float]], delta: float) -> float:
        return _pld_cached(float(delta), self._key(history))

    def rdp(self, history: Sequence[Sequence[float]], delta: float) -> float:
        return _rdp_cached(float(delta), self._key(history))

    def replace_one(self, history: Sequence[Sequence[float]], delta: float) -> float:
        return _replace_one_cached(float(delta), self._key(history))


# ---------------------------------------------------------------------------------------------
# Per-entry checks
# ---------------------------------------------------------------------------------------------


@dataclass
class _Where:
    path: Path
    line: int
    prefix: str = ""  # "bank_entry." inside a mirror line

    def source(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class _Collector:
    findings: list[Finding] = field(default_factory=list)

    def add(
        self, severity: Severity, check: str, where: _Where | tuple[Path, int | None], message: str, entry=None
    ) -> None:
        path, line = (where.path, where.line) if isinstance(where, _Where) else where
        bank = entry.get("bank_id") if isinstance(entry, Mapping) else None
        rnd = entry.get("round") if isinstance(entry, Mapping) else None
        self.findings.append(
            Finding(
                severity,
                check,
                path,
                line,
                message,
                bank if isinstance(bank, str) else None,
                rnd if isinstance(rnd, int) else None,
            )
        )


def _valid_history(history: Any) -> bool:
    return isinstance(history, list) and all(
        isinstance(e, list)
        and len(e) == 3
        and all(is_json_type(v, (int, float)) for v in e[:2])
        and is_json_type(e[2], (int,))
        and math.isfinite(e[0])
        and e[0] > 0
        and 0 < e[1] <= 1
        and e[2] >= 0
        for e in history
    )


def _rel(a: float, b: float) -> str:
    return f"{100 * abs(a - b) / max(abs(b), 1e-12):.2f}%"


def _check_entry(
    entry: Mapping[str, Any], where: _Where, prev: Mapping[str, Any] | None, rec: _Recompute, out: _Collector
) -> bool:
    """Checks one bank entry; returns False if it is too malformed to summarize."""
    p = where.prefix
    if entry.get("schema") != BANK_SCHEMA:
        out.add("error", "schema", where, f"field '{p}schema': expected {BANK_SCHEMA!r}, got {entry.get('schema')!r}")
        return False
    bad = []
    for name, (types, nullable) in _BANK_FIELDS.items():
        if name not in entry:
            bad.append(f"'{p}{name}' missing")
        elif entry[name] is None and nullable:
            continue
        elif not is_json_type(entry[name], types):
            bad.append(f"'{p}{name}' expected {'/'.join(t.__name__ for t in types)}, got {entry[name]!r}")
    if bad:
        out.add("error", "schema", where, "; ".join(bad), entry)
        return False
    status, history, delta = entry["status"], entry["history"], float(entry["delta"])
    if status not in ROUND_STATUSES:
        out.add("error", "schema", where, f"field '{p}status': expected one of {list(ROUND_STATUSES)}, got {status!r}")
        return False
    if not _valid_history(history):
        out.add(
            "error", "schema", where, f"field '{p}history': expected [[sigma > 0, 0 < q <= 1, steps >= 0], ...]", entry
        )
        return False
    if not 0 < delta < 1:
        out.add("error", "schema", where, f"field '{p}delta': expected a number in (0, 1), got {delta!r}", entry)
        return False
    if entry["poisson_sampling"] is not True:
        out.add(
            "error",
            "poisson",
            where,
            f"non-Poisson entry: field '{p}poisson_sampling' is {entry['poisson_sampling']!r}; the "
            "subsampled-Gaussian accounting assumes Poisson sampling, so this epsilon does not hold",
            entry,
        )
    _check_privacy_flags(entry, where, out)
    mechanism = [entry["noise_multiplier"], entry["sample_rate"], entry["local_steps"]]
    this = None
    if any(v is not None for v in mechanism):
        if any(v is None for v in mechanism) or not _valid_history([mechanism]):
            out.add(
                "error",
                "schema",
                where,
                f"fields '{p}noise_multiplier', 'sample_rate', 'local_steps': expected all null or sigma > 0, "
                f"0 < q <= 1, steps >= 0; got {mechanism}",
                entry,
            )
            return False
        this = [float(mechanism[0]), float(mechanism[1]), int(mechanism[2])]

    # ---- history continuity -----------------------------------------------------------------
    if status == "trained":
        if this is None:
            out.add("error", "history", where, f"trained entry without '{p}noise_multiplier'/'sample_rate'", entry)
            return False
        if not history or history[-1] != this:
            got = history[-1] if history else None
            out.add(
                "error",
                "history",
                where,
                f"field '{p}history' last entry: expected {this} (this round), got {got}",
                entry,
            )
        if entry["steps_run"] != this[2]:
            out.add(
                "error",
                "history",
                where,
                f"field '{p}steps_run': expected {this[2]} (local_steps), got {entry['steps_run']}",
                entry,
            )
        q_expected = entry["expected_batch_size"] / entry["n_samples"] if entry["n_samples"] > 0 else float("nan")
        if not math.isclose(this[1], q_expected, rel_tol=1e-9):
            out.add(
                "error",
                "history",
                where,
                f"field '{p}sample_rate': expected expected_batch_size / n_samples = {q_expected:.6g}, "
                f"got {this[1]:.6g}",
                entry,
            )
    elif entry["steps_run"] != 0:
        out.add(
            "error",
            "history",
            where,
            f"field '{p}steps_run': a {status} round runs no step, got {entry['steps_run']}",
            entry,
        )
    if prev is not None:
        expected_history = list(prev["history"]) + ([this] if status == "trained" else [])
        if history != expected_history:
            out.add(
                "error",
                "history",
                where,
                f"field '{p}history': expected the previous entry's {len(prev['history'])} round(s)"
                f"{' plus this round' if status == 'trained' else ' unchanged (nothing spent)'}, got {len(history)} "
                "different entr(ies)",
                entry,
            )
        same_job = entry["job_id"] == prev["job_id"]  # a new job on the same data may read the curve elsewhere
        if entry["dataset_fingerprint"] != prev["dataset_fingerprint"]:  # rows added to the same dataset
            out.add("warning", "dataset-changed", where, "the dataset's records changed (fingerprint "
                    f"{str(prev['dataset_fingerprint'])[:12]}... -> {str(entry['dataset_fingerprint'])[:12]}...) "
                    "under the same ledger: one budget covers both", entry)  # fmt: skip
        for name in ("bank_id", "dataset_id", *(("accountant", "delta") if same_job else ())):
            if entry[name] != prev[name]:
                out.add(
                    "error",
                    "sequence",
                    where,
                    f"field '{p}{name}': expected {prev[name]!r} as before, got {entry[name]!r}",
                    entry,
                )
        if same_job and entry["round"] < prev["round"]:
            out.add(
                "error",
                "sequence",
                where,
                f"field '{p}round': expected >= {prev['round']} (rounds in order), got {entry['round']}",
                entry,
            )
        elif same_job and entry["round"] == prev["round"]:  # a round re-run after an interruption: both count
            out.add("warning", "sequence", where, f"round {entry['round']} recorded again (re-run?)", entry)
        if entry["budget_epsilon"] != prev["budget_epsilon"]:
            out.add(
                "warning",
                "budget-changed",
                where,
                f"budget changed from {prev['budget_epsilon']} to {entry['budget_epsilon']}",
                entry,
            )
    elif entry.get("seq") == 1:  # the bank's first entry: its accountant history starts empty
        expected_history = [this] if status == "trained" else []
        if history != expected_history:
            out.add(
                "error",
                "history",
                where,
                f"field '{p}history': the bank's first entry expected {expected_history}, got {len(history)} round(s)",
                entry,
            )

    accountant = entry["accountant"]
    if accountant not in ("prv", "rdp"):
        out.add("error", "schema", where, f"field '{p}accountant': expected 'prv' or 'rdp', got {accountant!r}", entry)
        return False
    try:
        return _check_epsilons(entry, where, this, rec, out)
    except (ValueError, ArithmeticError, RuntimeError) as err:  # dp_accounting on absurd numbers
        out.add("error", "epsilon", where, f"cannot recompute epsilon from field '{p}history': {err}", entry)
        return False


def _check_privacy_flags(entry: Mapping[str, Any], where: _Where, out: _Collector) -> None:
    """Failing findings for settings under which the recorded epsilon does not protect anyone."""
    p = where.prefix
    if entry["noise_source"] == "seeded":
        out.add(
            "error",
            "seeded-noise",
            where,
            f"field '{p}noise_source' is 'seeded': sampling and noise were seeded from job values, so anyone "
            "holding the update can reproduce it (epsilon is infinite in practice). What to do: set "
            "seeded-noise = false in the bank's policy; treat this dataset's releases as non-private",
            entry,
        )
    if entry["status"] == "non-private":
        out.add(
            "error",
            "non-private",
            where,
            f"round {entry['round']} trained without DP (the bank's policy had allow-no-dp = true). What to do: "
            "set allow-no-dp = false; this dataset's model updates of that round are not protected",
            entry,
        )
    if entry["customer_ids"] and entry["privacy_unit"] == "record" and entry["status"] == "trained":
        out.add(
            "warning",
            "record-level",
            where,
            "the data has customer ids, but the bank's policy says privacy-unit = 'record' (customer-level is the "
            "default): a customer's whole history is protected only record by record",
            entry,
        )
    n = entry["n_samples"]
    if n > 0 and entry["delta"] > 1.0 / n:
        out.add(
            "error",
            "delta",
            where,
            f"field '{p}delta' = {entry['delta']:g} > 1/n = {1.0 / n:.3g}: at this delta the mechanism may "
            "release a whole record outright. What to do: lower max-delta in the bank's policy",
            entry,
        )


def _check_epsilons(
    entry: Mapping[str, Any], where: _Where, this: list | None, rec: _Recompute, out: _Collector
) -> bool:
    """The epsilon and budget checks of one (well-formed) bank entry."""
    p, status, history, delta = where.prefix, entry["status"], entry["history"], float(entry["delta"])
    accountant = entry["accountant"]
    pld = rec.pld(history, delta)

    def compare(name: str, recorded: float, reference: float, method: str, tol: tuple[float, float]) -> None:
        below, above = tol
        if not -below <= recorded - reference <= above:
            out.add(
                "error",
                "epsilon",
                where,
                f"field '{p}{name}': recorded {recorded:.6g}, recomputed {reference:.6g} by {method} from the recorded "
                f"history ({_rel(recorded, reference)} {'below' if recorded < reference else 'above'}; allowed "
                f"-{below:.3g} / +{above:.3g})",
                entry,
            )

    compare(
        "epsilon_pld", float(entry["epsilon_pld"]), pld, "PLD (dp_accounting)", epsilon_tolerance(pld, accountant="pld")
    )
    if entry["epsilon_prv"] is not None:
        prv = float(entry["epsilon_prv"])
        compare("epsilon_prv", prv, pld, "PLD (dp_accounting)", epsilon_tolerance(pld, accountant="prv"))
    if accountant == "rdp":
        rdp = rec.rdp(history, delta)
        compare(
            "epsilon", float(entry["epsilon"]), rdp, "RDP (dp_accounting)", epsilon_tolerance(rdp, accountant="rdp")
        )
    else:
        compare(
            "epsilon", float(entry["epsilon"]), pld, "PLD (dp_accounting)", epsilon_tolerance(pld, accountant="prv")
        )

    def by_bank_accountant(field: str, recorded_history: list) -> None:
        """A field the bank computed with its own accountant, against the same method recomputed."""
        reference = rec.rdp(recorded_history, delta) if accountant == "rdp" else rec.pld(recorded_history, delta)
        method = "RDP (dp_accounting)" if accountant == "rdp" else "PLD (dp_accounting)"
        compare(field, float(entry[field]), reference, method, epsilon_tolerance(reference, accountant=accountant))

    replace_one = entry.get("epsilon_replace_one")  # absent before issue 26; null if the bank could not compute it
    if replace_one is not None:
        reference = rec.replace_one(history, delta)
        tol = epsilon_tolerance(reference, accountant="pld")
        compare("epsilon_replace_one", float(replace_one), reference, "PLD replace-one (dp_accounting)", tol)
    by_bank_accountant("epsilon_before", history[:-1] if status == "trained" else history)
    if entry["epsilon_next_round"] is not None and this is not None:
        if replace_one is None:  # written before issue 26: the bank's own accountant only
            by_bank_accountant("epsilon_next_round", [*history, this])
        else:  # the larger of the two adjacencies the bank's budget check enforces
            nxt = [*history, this]
            own = rec.rdp(nxt, delta) if accountant == "rdp" else rec.pld(nxt, delta)
            reference = max(own, rec.replace_one(nxt, delta))
            tol = epsilon_tolerance(reference, accountant=accountant)
            compare(
                "epsilon_next_round", float(entry["epsilon_next_round"]), reference, "max(add/remove, replace-one)", tol
            )

    # ---- budget ---------------------------------------------------------------------------
    budget = float(entry["budget_epsilon"])
    if status == "trained" and float(entry["epsilon"]) > budget + 1e-9:
        out.add(
            "error",
            "budget",
            where,
            f"over budget: epsilon {entry['epsilon']:.6g} > budget_epsilon {budget:.6g}",
            entry,
        )
    elif status == "trained" and replace_one is not None and float(replace_one) > budget + 1e-9:
        out.add(
            "error",
            "budget",
            where,
            f"over budget under replace-one adjacency (the noise level depends on n): epsilon_replace_one "
            f"{float(replace_one):.6g} > budget_epsilon {budget:.6g}",
            entry,
        )
    budget_refusal = "rule 'lifetime-budget'" in str(entry["reason"])  # a policy rule's refusal is not about it
    if (
        status == "refused"
        and budget_refusal
        and entry["epsilon_next_round"] is not None
        and entry["epsilon_next_round"] <= budget
    ):
        out.add(
            "warning",
            "budget",
            where,
            f"refused although the next round ({entry['epsilon_next_round']:.4f}) fit the budget ({budget}). What "
            "to do: nothing was spent (a refusal records no overspend); ask the bank why its budget check refused",
            entry,
        )
    return True


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@dataclass
class _BankView:
    """What one file says about one (job, bank)."""

    path: Path
    kind: str
    entries: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (line, bank entry)
    server: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (line, mirror line) for mirrors
    chain_ok: bool = True
    head_hash: str = ""  # the file's last verified hash
    n_lines: int = 0  # the file's entries (its chain's length)


def _keep_first(
    found: dict[tuple[str, str], _BankView],
    views: dict[tuple[str, str], _BankView],
    check: str,
    what: str,
    out: _Collector,
) -> None:
    """Adds each (job, bank) view not seen yet; a second file for the same one is an error naming the first."""
    for key, view in views.items():
        if key in found:
            out.add("error", check, (view.path, None), f"second {what} for job/bank {key} (first: {found[key].path})")
        else:
            found[key] = view


def _file_kind(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "unknown"
    schema = entries[0].get("schema")
    return {BANK_SCHEMA: "bank", MIRROR_SCHEMA: "mirror"}.get(schema, "unknown")


def _check_signature(entry: Mapping[str, Any], where: _Where, pins: ConsortiumPins | None, out: _Collector) -> None:
    """Authorship: the bank's identity key signed this entry's hash (the chain alone proves order only)."""
    if not isinstance(entry.get("signature"), str) or not isinstance(entry.get("signer"), str):
        out.add(
            "error",
            "missing-signature",
            where,
            "entry not signed by the bank's identity key: anyone with write access could have rewritten the "
            "whole chain consistently. What to do: provision the bank's identity key (node-config identity-key)",
            entry,
        )
        return
    message = signed_message(str(entry.get("bank_id")), str(entry.get("hash")))
    try:
        signature = bytes.fromhex(entry["signature"])
        if pins is not None:
            pins.verify(str(entry.get("bank_id")), message, signature)
        else:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(entry["signer"])).verify(signature, message)
    except (CryptoError, InvalidSignature, ValueError) as err:
        out.add(
            "error",
            "bad-signature",
            where,
            f"signature does not verify ({err}): the entry was not written by {entry.get('bank_id')!r}'s "
            f"{'pinned ' if pins is not None else ''}identity key. What to do: treat this ledger as forged",
            entry,
        )


def _audit_bank_file(
    path: Path,
    entries: list[dict[str, Any]],
    chain_ok: bool,
    rec: _Recompute,
    out: _Collector,
    pins: ConsortiumPins | None = None,
    policies: Mapping[str, tuple[Path, Any]] | None = None,
) -> dict[tuple[str, str], _BankView]:
    views: dict[tuple[str, str], _BankView] = {}
    prev: dict[str, Any] | None = None
    first_ids = None
    for line, entry in enumerate(entries, start=1):
        where = _Where(path, line)
        ids = entry.get("bank_id")  # one ledger per bank and dataset; the jobs on it follow each other
        if first_ids is None:
            first_ids = ids
        elif ids != first_ids:
            out.add("error", "sequence", where, f"bank_id: expected {first_ids!r} like line 1, got {ids!r}", entry)
        _check_signature(entry, where, pins, out)
        if _check_entry(entry, where, prev, rec, out):
            policy_path, policy = (policies or {}).get(str(entry["bank_id"]), (None, None))
            if policy is not None:
                check_entry_policy(entry, where, policy, policy_path, out.add)
            prev = entry
            key = (str(entry["job_id"]), str(entry["bank_id"]))
            views.setdefault(key, _BankView(path, "bank", chain_ok=chain_ok)).entries.append((line, entry))
        else:
            prev = None  # cannot check continuity across a malformed entry
    return views


def _audit_mirror_file(
    path: Path, entries: list[dict[str, Any]], chain_ok: bool, rec: _Recompute, out: _Collector
) -> dict[tuple[str, str], _BankView]:
    """A server mirror: per round what the server did and the bank's commitment to its entry.

    The mirror holds no numbers (n, sigma, epsilon stay at the bank): it anchors the bank's ledger
    against rewriting and truncation; epsilon is recomputed from the bank's own ledger.
    """
    views: dict[tuple[str, str], _BankView] = {}
    first_ids, prev_round, prev = None, None, None
    for line, wrapper in enumerate(entries, start=1):
        where = _Where(path, line)
        problem = _mirror_line_problem(wrapper, first_ids, prev_round)
        if problem is not None:
            out.add("error", "mirror", where, problem, wrapper)
            continue
        first_ids = first_ids or (wrapper["job_id"], wrapper["bank_id"])
        prev_round = wrapper["round"]
        if str(wrapper.get("reason", "")).startswith(NAMED_POISONER):  # an accountable round named this bank
            out.add("warning", "named-poisoner", where, f"bank {wrapper['bank_id']!r}: {wrapper['reason']}", wrapper)
        view = views.setdefault(first_ids, _BankView(path, "mirror", chain_ok=chain_ok))
        view.server.append((line, wrapper))
        commitment = wrapper.get("commitment")
        if commitment is None:
            continue
        if prev is not None and commitment["seq"] == prev["seq"] + 1 and commitment["prev_hash"] != prev["hash"]:
            out.add(
                "error",
                "mirror",
                where,
                f"field 'commitment.prev_hash': expected {prev['hash'][:16]}... (the bank's entry seq {prev['seq']}), "
                f"got {commitment['prev_hash'][:16]}...",
                wrapper,
            )
        elif prev is not None and commitment["seq"] <= prev["seq"]:
            out.add("error", "mirror", where, f"field 'commitment.seq': expected > {prev['seq']}", wrapper)
        view.entries.append((line, commitment))
        prev = commitment
    return views


def _mirror_line_problem(wrapper: dict[str, Any], first_ids: tuple | None, prev_round: int | None) -> str | None:
    if wrapper.get("schema") != MIRROR_SCHEMA:
        return f"field 'schema': expected {MIRROR_SCHEMA!r}, got {wrapper.get('schema')!r}"
    ids = (wrapper.get("job_id"), wrapper.get("bank_id"))
    if first_ids is not None and ids != first_ids:
        return f"(job_id, bank_id): expected {first_ids} like line 1 (one mirror file per bank), got {ids}"
    status, rnd = wrapper.get("server_status"), wrapper.get("round")
    if status not in SERVER_STATUSES:
        return f"field 'server_status': expected one of {list(SERVER_STATUSES)}, got {status!r}"
    if not isinstance(rnd, int):
        return f"field 'round': expected an integer, got {rnd!r}"
    if prev_round is not None and rnd < prev_round:
        return f"field 'round': expected >= {prev_round} (rounds in order), got {rnd}"
    if wrapper.get("commitment") is None:
        return "server_status 'received' but field 'commitment' is null" if status == "received" else None
    try:
        check_commitment(wrapper["commitment"], bank_id=ids[1], round=rnd, job_id=ids[0])
    except LedgerError as err:
        return f"field 'commitment': {err}"
    return None


def _cross_check(bank_view: _BankView, mirror_view: _BankView, out: _Collector) -> None:
    bank_lines = bank_view.n_lines
    by_seq = {entry["seq"]: (line, entry) for line, entry in bank_view.entries}
    mirrored = set()
    for m_line, m_entry in mirror_view.entries:
        seq = m_entry["seq"]
        mirrored.add(seq)
        if seq in by_seq:
            line, entry = by_seq[seq]
            if entry["hash"] != m_entry["hash"]:
                out.add(
                    "error",
                    "cross-check",
                    (bank_view.path, line),
                    f"entry seq {seq} has hash {entry['hash'][:16]}..., the server's copy "
                    f"({mirror_view.path}:{m_line}) has {m_entry['hash'][:16]}...: the bank's ledger was rewritten",
                    entry,
                )
        elif seq > bank_lines and bank_view.chain_ok:
            out.add(
                "error",
                "cross-check",
                (bank_view.path, bank_lines + 1),
                f"the ledger ends after {bank_lines} entr(ies), but the server mirrored entry seq {seq} "
                f"(round {m_entry['round']}, {mirror_view.path}:{m_line}): entries were deleted from its end",
                m_entry,
            )
    # Entries the server never saw: fine for rounds that spent nothing (a bank records its own
    # skipped rounds), suspicious for trained ones (a lost reply, or the mirror lost lines).
    missing = sorted(s for s, (_, e) in by_seq.items() if s not in mirrored and e["status"] == "trained")
    if missing:
        out.add(
            "warning",
            "cross-check",
            (mirror_view.path, None),
            f"{len(missing)} trained entr(ies) of {bank_view.path} (seq {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}) are not in the server's mirror "
            "(reply lost, or the mirror lost lines)",
        )


def _mirror_without_ledger(key: tuple[str, str], mirror: _BankView, out: _Collector) -> None:
    """A mirror whose bank ledger was not given: an error when the server saw the bank train in the job
    (the mirror holds commitments only: without the ledger nothing can be recomputed), else a note."""
    job, bank = key
    commitments = [w["commitment"] for _, w in mirror.server if w.get("commitment") is not None]
    received = [w for _, w in mirror.server if w["server_status"] == "received"]
    if received or any(c["status"] in SPENDING_STATUSES for c in commitments):
        out.add(
            "error",
            "missing-ledger",
            (mirror.path, None),
            f"no bank ledger for job {job!r} bank {bank!r}: the server mirrored rounds it trained, but the "
            "bank's own ledger.jsonl was not given (or is lost). What to do: obtain it from the bank",
            {"bank_id": bank, "job_id": job},
        )
        return
    rows = ", ".join(
        f"{n} {status}" for status, n in sorted(Counter(w["server_status"] for _, w in mirror.server).items())
    )
    said = ", ".join(f"{n} {status}" for status, n in sorted(Counter(c["status"] for c in commitments).items()))
    out.add(
        "info",
        "not-trained",
        (mirror.path, None),
        f"bank {bank!r} never trained in job {job!r} (the server's mirror: {rows}"
        + (f"; its commitments: {said}" if said else "")
        + "): none of its updates reached the server, so nothing this job released needs its ledger (its "
        "lifetime ε, a round whose reply was lost included, is in its own ledger)",
        {"bank_id": bank, "job_id": job},
    )


def _summarize(
    key: tuple[str, str],
    authority: _BankView,
    mirror: _BankView | None,
    rec: _Recompute,
    findings: list[Finding],
    budget: tuple[float, BudgetSource],
) -> BankSummary | None:
    entries = [e for _, e in authority.entries]
    if not entries:
        return None
    last = entries[-1]
    delta, accountant = float(last["delta"]), str(last["accountant"])
    points = tuple(
        RoundPoint(
            round=int(e["round"]),
            status=str(e["status"]),
            epsilon=float(e["epsilon"]),
            epsilon_pld=rec.pld(e["history"], delta),
            noise_multiplier=e["noise_multiplier"] if e["status"] == "trained" else None,
            sample_rate=e["sample_rate"] if e["status"] == "trained" else None,
            steps=e["local_steps"] if e["status"] == "trained" else None,
            source=f"{authority.path}:{line}",
        )
        for line, e in authority.entries
    )
    by_status: dict[str, set[int]] = {s: set() for s in ROUND_STATUSES}
    for point in points:
        by_status[point.status].add(point.round)
    if mirror is not None:  # what only the server saw: rounds it skipped or dropped the bank
        trained = by_status["trained"]
        for _, wrapper in mirror.server:
            if wrapper["server_status"] in ("skipped", "dropped") and wrapper["round"] not in trained:
                by_status[wrapper["server_status"]].add(wrapper["round"])
    bank_paths = {authority.path} | ({mirror.path} if mirror else set())  # one bank per file
    ok = not any(f.severity == "error" and f.path in bank_paths for f in findings)
    return BankSummary(
        job_id=key[0],
        bank_id=key[1],
        accountant=accountant,
        delta=delta,
        budget=budget[0],
        budget_source=budget[1],
        authority=str(authority.path),
        points=points,
        rounds_trained=tuple(sorted(by_status["trained"])),
        rounds_refused=tuple(sorted(by_status["refused"])),
        rounds_skipped=tuple(sorted(by_status["skipped"])),
        rounds_dropped=tuple(sorted(by_status["dropped"])),
        epsilon_recorded=float(last["epsilon"]),
        epsilon_pld=rec.pld(last["history"], delta),
        epsilon_rdp=rec.rdp(last["history"], delta),
        ok=ok,
        entries=tuple(entries),
        head_hash=authority.head_hash,
        epsilon_replace_one=rec.replace_one(last["history"], delta),
    )


def _largest_budget(entries: list[dict[str, Any]]) -> float:
    """The largest `budget_epsilon` a bank's ledger records: every entry's is at most the bank's policy."""
    values = [float(e["budget_epsilon"]) for e in entries if is_json_type(e.get("budget_epsilon"), (int, float))]
    return max(values, default=0.0)


def _policy_budget(view: _BankView, policy: Any) -> tuple[float, BudgetSource] | None:
    """The bank's lifetime budget by its policy file, tightened by the node-config its last entry records."""
    if policy is None or not view.entries:
        return None
    overrides = view.entries[-1][1].get("policy_overrides") or {}
    try:
        return policy.tightened(**{k: float(v) for k, v in overrides.items()}).epsilon, "policy"
    except (ConfigError, KeyError, TypeError, ValueError):  # a 'policy-overrides' finding says why
        return policy.epsilon, "policy"


def _check_pinned_banks_present(
    pins: ConsortiumPins | None,
    pins_required: bool,
    bank_views: Mapping[tuple[str, str], _BankView],
    files: list[LedgerFile],
    out: _Collector,
    scope: Iterable[str] | None,
) -> None:
    """Without pins anyone can re-sign a forged ledger; with pins, a pinned bank's ledger must be there."""
    where = (files[0].path if files else Path("."), None)
    if pins is None:
        if pins_required and files:
            out.add("error", "signature", where, "no pinned consortium keys: anyone can re-hash and re-sign a forged "
                    "ledger with a key of their own. What to do: pass --pins FILE (the consortium's pins.json), or "
                    "--no-pins to check self-consistency only")  # fmt: skip
        elif bank_views:
            out.add("warning", "signature", where, "signatures were checked against the keys the entries name, not "
                    "against pinned consortium keys: pass --pins to prove authorship")  # fmt: skip
        return
    # banks with a ledger here (malformed or not: its findings say what is wrong with it), or a mirror
    # (a mirrored bank without a ledger is flagged above)
    present = {bank for _, bank in bank_views} | {b for f in files for b in f.bank_ids}
    required = set(pins.keys) if scope is None else set(pins.keys) & set(scope)
    for bank in sorted(required - present):
        out.add("error", "missing-ledger", where, f"bank {bank!r} is pinned but none of its ledgers was given (deleted "
                "or withheld?). What to do: obtain the bank's ledger.jsonl, or audit with the pins of the banks in "
                "scope only", {"bank_id": bank})  # fmt: skip


def audit_ledgers(
    paths: Iterable[str | os.PathLike[str]],
    *,
    pins: ConsortiumPins | None = None,
    policies: Mapping[str, str | os.PathLike[str]] | None = None,
    pins_required: bool = False,
    scope: Iterable[str] | None = None,
) -> AuditResult:
    """Verifies bank ledgers and server mirror files; recomputes every epsilon independently.

    Pure: reads the files, prints nothing, raises nothing for bad content (every problem is a
    `Finding` naming its file and line).

    Args:
        paths: bank `ledger.jsonl` files and/or server `ledger-mirror/<bank>.jsonl` files, in
            any order. A bank's own ledger is the authority for its numbers; the mirror is
            cross-checked against it.
        pins: the consortium's pinned identity keys; every entry's signature must verify under
            the key pinned for its bank. Without pins, signatures are checked against the key the
            entry names (self-consistency only), and a warning says so. Every pinned bank must
            have a bank ledger among `paths` (a deleted ledger is an error, mirrors or not).
        pins_required: no pins is an error, not a warning (the CLI's default; `--no-pins` lifts it).
        scope: the banks this audit covers (default: every pinned bank); a pinned bank outside it
            need not have a ledger here.

    Returns:
        AuditResult (`ok` is False when any check failed).
    """
    out = _Collector()
    rec = _Recompute()
    files: list[LedgerFile] = []
    bank_views: dict[tuple[str, str], _BankView] = {}
    mirror_views: dict[tuple[str, str], _BankView] = {}
    loaded = load_policies(policies, out.add)
    bank_files: list[tuple[Path, list[dict[str, Any]]]] = []
    for raw in paths:
        path = Path(raw)
        chain, entries = read_verified(path)
        if not chain.ok:
            out.add("error", "chain", (path, chain.first_bad_line or None), chain.problem)
        kind = _file_kind(entries)
        if kind == "bank":
            views = _audit_bank_file(path, entries, chain.ok, rec, out, pins, loaded)
            bank_files.append((path, entries))
            for view in views.values():
                view.head_hash, view.n_lines = chain.last_hash, chain.n_entries
            _keep_first(bank_views, views, "sequence", "bank ledger", out)
        elif kind == "mirror":
            _keep_first(
                mirror_views, _audit_mirror_file(path, entries, chain.ok, rec, out), "mirror", "mirror file", out
            )
        elif entries:
            out.add(
                "error",
                "schema",
                (path, 1),
                f"field 'schema': expected {BANK_SCHEMA!r} or {MIRROR_SCHEMA!r}, got {entries[0].get('schema')!r}",
            )
        elif chain.ok:
            out.add("warning", "schema", (path, None), "empty ledger")
        ids = sorted({(str(e.get("job_id")), str(e.get("bank_id"))) for e in entries})
        files.append(LedgerFile(path, kind, chain, tuple(b for _, b in ids), tuple(sorted({j for j, _ in ids}))))

    check_dataset_identities(bank_files, loaded, out.add)
    for key, mirror in mirror_views.items():
        if key in bank_views:
            _cross_check(bank_views[key], mirror, out)
        else:
            _mirror_without_ledger(key, mirror, out)

    _check_pinned_banks_present(pins, pins_required, bank_views, files, out, scope)
    summaries = []
    recorded = {path: _largest_budget(entries) for path, entries in bank_files}
    for key in sorted(bank_views):
        view = bank_views[key]
        budget = _policy_budget(view, loaded.get(key[1], (None, None))[1]) or (recorded.get(view.path, 0.0), "ledger")
        summary = _summarize(key, view, mirror_views.get(key), rec, out.findings, budget)
        if summary is not None:
            summaries.append(summary)
    return AuditResult(tuple(files), tuple(summaries), tuple(out.findings), pins_checked=pins is not None)
