"""The privacy-budget ledger: append-only, hash-chained JSONL, one entry per (bank, round).

Each bank keeps `ledger.jsonl` in its state dir; it is the authority for the bank's own budget.
The server keeps a mirror per bank, `<server-state>/<job>/ledger-mirror/<bank>.jsonl`, whose lines
wrap the entry the bank reported, verbatim, so the bank's hashes can be cross-checked later
(`python -m fl_server.audit`).

Format (both kinds of file):
    - one JSON object per line, in canonical form: keys sorted, no spaces, UTF-8, no NaN/inf
      (`canonical_json`); every line ends with a newline;
    - `seq` is the 1-based line number, `prev_hash` the `hash` of the line before (64 zeros on
      line 1), `hash` = SHA-256 hex of the canonical JSON of the object without its `hash`.
Editing any field of any line breaks that line's hash; deleting or reordering lines breaks the
`seq`/`prev_hash` of the next line. Deleting the *last* lines leaves a valid shorter chain: the
server's mirror (an anchor held by another party) catches that, see fl_server.audit.

A bank's entry (`round_entry`) records everything needed to re-derive its epsilon without
trusting it: sigma, q, steps, clip norm, expected batch, dataset size, privacy unit, Poisson
sampling, secure mode, the accountant and its full history, epsilon by the bank's accountant,
by PRV and by an independent dp_accounting PLD computation, the budget, the epsilon one more
identical round would reach (`epsilon_next_round`, what the server's selection reads) and
library versions. Rounds a bank refused, skipped or was dropped from spend nothing and say so.

Statuses:
    bank ledger  "trained" (spent: history grew by one entry), "refused" (its budget check said
                 no), "skipped" (it was not asked; recorded when it next hears from the server),
                 "dropped" (it knows it was left out without training).
    mirror       server_status "received" (the bank's entry attached), "skipped" (not selected:
                 budget exhausted / not connected), "dropped" (selected but left out: no reply,
                 client error, invalid ciphertext; the bank's entry attached if one arrived --
                 a "trained" bank entry still counts as spent).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fl_client.dp.accountant import (
    PRV_EPS_ERROR,
    AccountantState,
    HistoryEntry,
    epsilon_for_history,
    noise_multiplier_for,
    sample_rate_for,
)
from fl_client.dp.config import DPConfig
from fl_client.dp.errors import DPError
from fl_client.dp.trainer import RoundPrivacyReport

BANK_SCHEMA = "fedmoe.ledger.bank/1"
MIRROR_SCHEMA = "fedmoe.ledger.mirror/1"
GENESIS_HASH = "0" * 64
CHAIN_FIELDS = ("seq", "prev_hash", "hash")

RoundStatus = Literal["trained", "refused", "skipped", "dropped"]
ServerStatus = Literal["received", "skipped", "dropped"]
ROUND_STATUSES: tuple[str, ...] = ("trained", "refused", "skipped", "dropped")
SERVER_STATUSES: tuple[str, ...] = ("received", "skipped", "dropped")

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
_SAFE_BANK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LedgerError(ValueError):
    """A ledger file or entry is malformed or its chain is broken; names file, line, field, expected vs got."""


# ---------------------------------------------------------------------------------------------
# Canonical JSON and hashes
# ---------------------------------------------------------------------------------------------


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 text, finite numbers only: one byte string per value.

    Raises:
        LedgerError: NaN/inf or a value JSON cannot hold.
    """
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise LedgerError(f"ledger entry is not canonical JSON: {err}") from None


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 hex over the canonical JSON of `entry` without its `hash` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def utc_now() -> str:
    """ISO 8601 UTC timestamp with microseconds, e.g. 2026-01-31T12:00:00.000001Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------------------------
# Chain verification
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainReport:
    """The outcome of checking one ledger file's hash chain.

    Attributes:
        path: the file.
        ok: every line parsed, is canonical, and chains to the one before.
        n_entries: lines that verified (all of them when ok; the good prefix otherwise).
        first_bad_line: 1-based line number of the first broken or edited line, or None.
        problem: what is wrong with it ("" when ok).
        last_hash: hash of the last verified line (GENESIS_HASH for an empty file).
    """

    path: Path
    ok: bool
    n_entries: int
    first_bad_line: int | None = None
    problem: str = ""
    last_hash: str = GENESIS_HASH

    def describe(self) -> str:
        if self.ok:
            return f"{self.path}: chain ok, {self.n_entries} entries"
        return f"{self.path}:{self.first_bad_line}: {self.problem}"


@dataclass(frozen=True)
class _Parsed:
    report: ChainReport
    entries: list[dict[str, Any]] = field(default_factory=list)  # the verified prefix


def _parse_chain(path: Path, data: bytes) -> _Parsed:
    entries: list[dict[str, Any]] = []
    prev = GENESIS_HASH

    def bad(line: int, problem: str) -> _Parsed:
        return _Parsed(ChainReport(path, False, len(entries), line, problem, prev), entries)

    if not data:
        return _Parsed(ChainReport(path, True, 0))
    lines = data.split(b"\n")
    if lines[-1] != b"":
        return bad(len(lines), "incomplete last line (no newline): a write was cut off or the file was edited")
    for number, raw in enumerate(lines[:-1], start=1):
        try:
            text = raw.decode("utf-8")
            entry = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return bad(number, f"not valid JSON ({err})")
        if not isinstance(entry, dict):
            return bad(number, f"expected a JSON object, got {type(entry).__name__}")
        missing = [k for k in CHAIN_FIELDS if k not in entry]
        if missing:
            return bad(number, f"missing chain field(s) {missing}")
        try:
            canonical = canonical_json(entry)
        except LedgerError as err:
            return bad(number, str(err))
        if canonical != text:
            return bad(number, "line is not in canonical JSON form (edited by hand?)")
        if entry["seq"] != number:
            return bad(number, f"field 'seq': expected {number}, got {entry['seq']!r} (a line was deleted or moved)")
        if entry["prev_hash"] != prev:
            return bad(
                number,
                f"field 'prev_hash': expected {prev[:16]}... (hash of line {number - 1}), got "
                f"{str(entry['prev_hash'])[:16]}... (a line before it was deleted, inserted or edited)",
            )
        recomputed = entry_hash(entry)
        if entry["hash"] != recomputed:
            return bad(
                number,
                f"field 'hash': expected {recomputed[:16]}... for the line's content, got "
                f"{str(entry['hash'])[:16]}... (the line was edited)",
            )
        prev = entry["hash"]
        entries.append(entry)
    return _Parsed(ChainReport(path, True, len(entries), last_hash=prev), entries)


def verify_chain(path: str | os.PathLike[str]) -> ChainReport:
    """Checks a ledger file's hash chain line by line; names the first broken or edited line.

    Args:
        path: a bank ledger or a server mirror file.

    Returns:
        ChainReport (ok=False with first_bad_line and problem when the chain is broken, or the
        file is missing: first_bad_line=0).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ChainReport(path, False, 0, 0, "file not found")
    return _parse_chain(path, data).report


def read_verified(path: str | os.PathLike[str]) -> tuple[ChainReport, list[dict[str, Any]]]:
    """The chain report and the entries of its verified prefix (all of them when ok)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ChainReport(path, False, 0, 0, "file not found"), []
    parsed = _parse_chain(path, data)
    return parsed.report, parsed.entries


# ---------------------------------------------------------------------------------------------
# The ledger file
# ---------------------------------------------------------------------------------------------


class Ledger:
    """An append-only, hash-chained JSONL file (a bank's ledger or one bank's server mirror).

    Args:
        path: the file; created (with its folder) on the first append.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"

    @property
    def _lock_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A sibling lock file: the ledger itself is replaced by rename on every append.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self) -> tuple[bytes, _Parsed]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        parsed = _parse_chain(self.path, data)
        if not parsed.report.ok:
            raise LedgerError(f"{parsed.report.describe()}; refusing to use a broken ledger")
        return data, parsed

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first, after verifying the chain.

        Raises:
            LedgerError: the chain is broken (names the file and line).
        """
        return self._read()[1].entries

    def last(self) -> dict[str, Any] | None:
        """The newest entry, or None for an empty or missing ledger (chain verified)."""
        entries = self.entries()
        return entries[-1] if entries else None

    def append(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Appends one entry: adds `seq`, `prev_hash`, `hash` and a `written_at` timestamp.

        The file is rewritten whole to a temp file, fsynced and renamed over the old one (then
        the folder is fsynced), so a crash leaves the old ledger or the new one, never half a
        line. An exclusive lock serializes concurrent appenders.

        Args:
            entry: a JSON object without `seq`, `prev_hash` or `hash` (e.g. from `round_entry`).

        Returns:
            The entry as stored.

        Raises:
            LedgerError: the existing chain is broken (nothing is written), the entry carries
                chain fields already, or it is not canonical JSON (NaN, non-string keys, ...).
        """
        if not isinstance(entry, Mapping):
            raise LedgerError(f"{self.path}: entry expected a JSON object (dict), got {type(entry).__name__}")
        preset = [k for k in CHAIN_FIELDS if k in entry]
        if preset:
            raise LedgerError(f"{self.path}: entry must not carry {preset}; the ledger sets them")
        with self._locked():
            data, parsed = self._read()
            stored = dict(entry)
            if stored.get("written_at") is None:
                stored["written_at"] = utc_now()
            stored["seq"] = parsed.report.n_entries + 1
            stored["prev_hash"] = parsed.report.last_hash
            stored["hash"] = entry_hash(stored)
            line = (canonical_json(stored) + "\n").encode("utf-8")
            _atomic_write(self.path, data + line)
        return stored


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------------------------
# Independent accounting (dp_accounting) over a recorded history
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    """Versions of python and the packages privacy depends on ("absent" if not installed)."""
    out = {"python": platform.python_version()}
    for key, dist in VERSIONED_PACKAGES.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = "absent"
    return out


def planned_round(cfg: DPConfig, n_samples: int) -> HistoryEntry:
    """The history entry the bank's next round would add: (sigma, q, local_steps).

    Raises:
        DPError: q > 1 or a budget no noise can meet (see `noise_multiplier_for`).
    """
    return HistoryEntry(noise_multiplier_for(cfg, n_samples), sample_rate_for(cfg, n_samples), cfg.local_steps)


def next_round_epsilon(state: AccountantState, planned: HistoryEntry) -> float:
    """The epsilon the bank would reach after one more round `planned`, by its own accountant."""
    return state.appended(planned).epsilon()


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

    Returns:
        A JSON-ready dict (schema BANK_SCHEMA) for `Ledger.append`.

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
        history = report.history
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
        history = state.history
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
    return {
        "schema": BANK_SCHEMA,
        "job_id": job_id,
        "bank_id": bank_id,
        "round": round,
        "status": status,
        "reason": reason,
        "started_at": started_at,
        # the mechanism of this round (planned for a refusal; None when unknown)
        "noise_multiplier": None if this is None else float(this.noise_multiplier),
        "sample_rate": None if this is None else float(this.sample_rate),
        "local_steps": None if this is None else int(this.steps),
        "steps_run": int(report.steps) if report is not None else 0,
        "clip_norm": float(cfg.clip_norm),
        "expected_batch_size": int(cfg.expected_batch_size),
        "n_samples": int(n_samples),
        "privacy_unit": cfg.privacy_unit,
        # fl_client.dp always samples each step's batch by Poisson(q) (PoissonBatchSampler),
        # what the subsampled-Gaussian accountants assume.
        "poisson_sampling": True,
        "secure_mode": bool(cfg.secure_mode),
        "grad_sample_mode": cfg.grad_sample_mode,
        # accounting, at the bank's delta
        "accountant": cfg.accountant,
        "delta": float(cfg.delta),
        "history": _history_list(history),
        "epsilon": float(epsilon),
        "epsilon_before": float(epsilon_before),
        "epsilon_spent_this_round": float(epsilon - epsilon_before),
        "epsilon_prv": None if eps_prv is None else float(eps_prv),
        "epsilon_pld": epsilon_pld(history, delta=cfg.delta),
        "epsilon_next_round": None if epsilon_next_round is None else float(epsilon_next_round),
        "budget_epsilon": float(budget_epsilon),
        "versions": library_versions(),
    }


def check_bank_entry(
    entry: Any, *, bank_id: str | None = None, round: int | None = None, job_id: str | None = None
) -> dict[str, Any]:
    """Checks a bank's reported entry (dict or its JSON text) before the server mirrors it.

    Returns:
        The entry as a dict.

    Raises:
        LedgerError: not a JSON object, wrong schema, a hash that does not match the content,
            or bank/round/job other than expected.
    """
    if isinstance(entry, (str, bytes)):
        try:
            entry = json.loads(entry)
        except json.JSONDecodeError as err:
            raise LedgerError(f"bank entry: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(entry, dict):
        raise LedgerError(f"bank entry: expected a JSON object, got {type(entry).__name__}")
    where = f"bank entry of {entry.get('bank_id')!r} round {entry.get('round')!r}"
    if entry.get("schema") != BANK_SCHEMA:
        raise LedgerError(f"{where}: field 'schema' expected {BANK_SCHEMA!r}, got {entry.get('schema')!r}")
    missing = [k for k in CHAIN_FIELDS if k not in entry]
    if missing:
        raise LedgerError(f"{where}: missing chain field(s) {missing} (not an appended ledger entry)")
    if isinstance(entry["seq"], bool) or not isinstance(entry["seq"], int) or entry["seq"] < 1:
        raise LedgerError(f"{where}: field 'seq' expected an integer >= 1, got {entry['seq']!r}")
    if not isinstance(entry["prev_hash"], str) or not isinstance(entry["hash"], str):
        raise LedgerError(f"{where}: fields 'prev_hash' and 'hash' expected hex strings")
    recomputed = entry_hash(entry)
    if entry["hash"] != recomputed:
        raise LedgerError(f"{where}: field 'hash' expected {recomputed[:16]}..., got {str(entry['hash'])[:16]}...")
    for name, expected in (("bank_id", bank_id), ("round", round), ("job_id", job_id)):
        if expected is not None and entry.get(name) != expected:
            raise LedgerError(f"{where}: field {name!r} expected {expected!r}, got {entry.get(name)!r}")
    return entry


def mirror_entry(
    *,
    job_id: str,
    bank_id: str,
    round: int,
    server_status: ServerStatus,
    bank_entry: Mapping[str, Any] | str | None,
    reason: str = "",
    received_at: str | None = None,
) -> dict[str, Any]:
    """A server mirror line: the bank's reported entry, verbatim, and what the server did.

    Args:
        job_id, bank_id, round: the round.
        server_status: "received", "skipped" or "dropped" (see the module docstring).
        bank_entry: the entry the bank reported (its JSON text or the dict), None if none came.
        reason: why the bank was skipped or dropped.
        received_at: when the reply arrived (default: now).

    Returns:
        A JSON-ready dict (schema MIRROR_SCHEMA) for the bank's mirror `Ledger.append`.

    Raises:
        LedgerError: unknown status, "received" without an entry, or an entry that fails
            `check_bank_entry` (the server should then leave the bank out and mirror
            server_status="dropped" with bank_entry=None and the error as reason).
    """
    if server_status not in SERVER_STATUSES:
        raise LedgerError(
            f"mirror entry for bank {bank_id!r} round {round}: server_status expected one of "
            f"{list(SERVER_STATUSES)}, got {server_status!r}"
        )
    if server_status == "received" and bank_entry is None:
        raise LedgerError(f"mirror entry for bank {bank_id!r} round {round}: 'received' needs the bank's entry")
    checked = None
    if bank_entry is not None:
        checked = check_bank_entry(bank_entry, bank_id=bank_id, round=round, job_id=job_id)
    return {
        "schema": MIRROR_SCHEMA,
        "job_id": job_id,
        "bank_id": bank_id,
        "round": round,
        "server_status": server_status,
        "reason": reason,
        "received_at": received_at or utc_now(),
        "bank_entry": checked,
    }


def mirror_path(mirror_dir: str | os.PathLike[str], bank_id: str) -> Path:
    """`<mirror_dir>/<bank_id>.jsonl`, after checking the bank id is a safe file name.

    Raises:
        LedgerError: a bank id with path separators, leading dots or other odd characters.
    """
    if not _SAFE_BANK_ID.match(bank_id):
        raise LedgerError(
            f"mirror file for bank {bank_id!r}: expected a bank id of letters, digits, '.', '_', '-' "
            "(starting with a letter or digit, at most 128 characters)"
        )
    return Path(mirror_dir) / f"{bank_id}.jsonl"


def latest_bank_entry(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The newest bank-authored entry among bank-ledger entries or mirror lines (None if none)."""
    for entry in reversed(entries):
        inner = entry.get("bank_entry", entry) if entry.get("schema") == MIRROR_SCHEMA else entry
        if isinstance(inner, dict) and inner.get("schema") == BANK_SCHEMA:
            return dict(inner)
    return None


def accountant_state_from_ledger(entries: Sequence[Mapping[str, Any]], cfg: DPConfig) -> AccountantState | None:
    """The accountant state the bank's ledger implies (its last entry's history), or None if empty.

    The ledger is appended *before* accountant.json is saved, so after a crash between the two
    the ledger is the longer (and right) one: load the bank's state from here when they differ.

    Raises:
        LedgerError: the last entry was written under another accountant or delta than `cfg`.
    """
    if not entries:
        return None
    last = entries[-1]
    if (last.get("accountant"), last.get("delta")) != (cfg.accountant, cfg.delta):
        raise LedgerError(
            f"ledger entry seq {last.get('seq')}: accountant/delta expected {(cfg.accountant, cfg.delta)} "
            f"(bank {cfg.bank_id!r}'s DP config), got {(last.get('accountant'), last.get('delta'))}"
        )
    history = tuple(HistoryEntry(float(s), float(q), int(n)) for s, q, n in last["history"])
    return AccountantState(mechanism=cfg.accountant, delta=float(cfg.delta), history=history)


def skipped_rounds(entries: Sequence[Mapping[str, Any]], upcoming_round: int) -> list[int]:
    """Rounds between the bank's last ledger entry and `upcoming_round` it never heard of.

    A bank calls this when a train request for `upcoming_round` arrives and records each
    returned round as "skipped" (nothing spent) before handling the request. A fresh ledger
    returns [] (rounds before a bank's first request are not its rounds).
    """
    rounds = [int(e["round"]) for e in entries if isinstance(e.get("round"), int)]
    if not rounds:
        return []
    return list(range(max(rounds) + 1, upcoming_round))


# ---------------------------------------------------------------------------------------------
# Server-side budget decisions (pure)
# ---------------------------------------------------------------------------------------------


def bank_exhausted(latest_entry: Mapping[str, Any] | None) -> bool:
    """Whether a bank's latest entry says it cannot take one more round within its budget.

    Reads `epsilon_next_round` (the epsilon one more identical round would reach, by the bank's
    own accountant) against `budget_epsilon`, exactly the bank's own refusal test
    (`check_budget`: refuse when after > budget). A "refused" entry is exhausted whatever its
    numbers. Accepts a bank entry or a mirror line (its `bank_entry` is read).

    Returns:
        False for None (the bank has not reported yet) or an entry without the two numbers.
    """
    if latest_entry is None:
        return False
    entry: Mapping[str, Any] | None = latest_entry
    if latest_entry.get("schema") == MIRROR_SCHEMA:
        entry = latest_entry.get("bank_entry")
        if entry is None:
            return False
    if entry.get("status") == "refused":
        return True
    nxt, budget = entry.get("epsilon_next_round"), entry.get("budget_epsilon")
    if not isinstance(nxt, (int, float)) or not isinstance(budget, (int, float)):
        return False
    return not (math.isfinite(nxt) and nxt <= budget)  # NaN or inf: exhausted (conservative)


@dataclass(frozen=True)
class BankSelection:
    """The server's choice for the next round.

    Attributes:
        selected: banks to send the round to (sorted).
        exhausted: bank -> why it is no longer selected (budget).
        end_job: fewer than min_banks can still train: the job ends.
        reason: why the job ends ("" otherwise).
    """

    selected: list[str]
    exhausted: dict[str, str]
    end_job: bool
    reason: str = ""


def select_banks(latest: Mapping[str, Mapping[str, Any] | None], *, min_banks: int) -> BankSelection:
    """Drops banks whose budget is exhausted; ends the job when fewer than `min_banks` remain.

    Args:
        latest: for every connected bank, its latest mirrored entry (bank entry or mirror line;
            None for a bank that has not reported yet, which stays selectable).
        min_banks: the job's min-banks.

    Returns:
        BankSelection; exhausted reasons read "budget exhausted after round R: ...".
    """
    selected, exhausted = [], {}
    for bank in sorted(latest):
        entry = latest[bank]
        if bank_exhausted(entry):
            inner = entry.get("bank_entry") if entry.get("schema") == MIRROR_SCHEMA else entry
            nxt = inner.get("epsilon_next_round")
            nxt_text = f"{nxt:.4f}" if isinstance(nxt, (int, float)) else "unknown"
            exhausted[bank] = (
                f"budget exhausted after round {inner.get('round')}: epsilon {inner.get('epsilon', 0.0):.4f}, "
                f"one more round would reach {nxt_text} > budget {inner.get('budget_epsilon')}"
            )
        else:
            selected.append(bank)
    if len(selected) < min_banks:
        reason = (
            f"only {len(selected)} bank(s) within budget ({', '.join(selected) or 'none'}), min-banks {min_banks}"
            + (f"; exhausted: {', '.join(sorted(exhausted))}" if exhausted else "")
        )
        return BankSelection(selected, exhausted, True, reason)
    return BankSelection(selected, exhausted, False)
