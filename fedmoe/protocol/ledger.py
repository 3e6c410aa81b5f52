"""The privacy-budget ledger: append-only, hash-chained JSONL, one entry per (bank, round).

Each bank keeps `ledger.jsonl` in its state dir; it is the authority for the bank's own budget.
The server keeps a mirror per bank, `<server-state>/<job>/ledger-mirror/<bank>.jsonl`, whose lines
wrap the entry the bank reported, verbatim, so the bank's hashes can be cross-checked later
(`python -m fedmoe.fl_server.audit`).

Format (both kinds of file):
    - one JSON object per line, in canonical form: keys sorted, no spaces, UTF-8, no NaN/inf
      (`canonical_json`); every line ends with a newline;
    - `seq` is the 1-based line number, `prev_hash` the `hash` of the line before (64 zeros on
      line 1), `hash` = SHA-256 hex of the canonical JSON of the object without its `hash`.
Editing any field of any line breaks that line's hash; deleting or reordering lines breaks the
`seq`/`prev_hash` of the next line. Deleting the *last* lines leaves a valid shorter chain: the
server's mirror (an anchor held by another party) catches that, see fedmoe.fl_server.audit.

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

import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fedmoe.protocol.errors import LedgerError
from fedmoe.protocol.files import atomic_write_bytes, exclusive_lock

__all__ = ["LedgerError"]

BANK_SCHEMA = "fedmoe.ledger.bank/1"
MIRROR_SCHEMA = "fedmoe.ledger.mirror/2"  # /2: the server keeps a commitment, not the entry
GENESIS_HASH = "0" * 64
CHAIN_FIELDS = ("seq", "prev_hash", "hash")

RoundStatus = Literal["trained", "refused", "skipped", "dropped", "failed", "non-private"]
ServerStatus = Literal["received", "skipped", "dropped"]
# The reason a mirror entry starts with when most banks' signed verdicts named the bank the poisoner of
# a quarantined secure round (docs/secagg.md "Accountable rounds"); the audit reports it.
NAMED_POISONER = "named a poisoner"
ROUND_STATUSES: tuple[str, ...] = typing.get_args(RoundStatus)
SERVER_STATUSES: tuple[str, ...] = typing.get_args(ServerStatus)
NoiseSource = Literal["csprng", "seeded", "none"]
NOISE_SOURCES: tuple[str, ...] = typing.get_args(NoiseSource)
_SAFE_BANK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
    """SHA-256 hex over the canonical JSON of `entry` without its `hash` and `signature` fields."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def signed_message(bank_id: str, hash_hex: str) -> bytes:
    """What a bank signs for one ledger entry: a domain tag, its id and the entry's hash."""
    return f"fedmoe.ledger.entry/1|{bank_id}|{hash_hex}".encode()


# A bank's signer: (its public key hex, a function signing bytes -> signature bytes).
Signer = tuple[str, Callable[[bytes], bytes]]


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

    def append(self, entry: Mapping[str, Any], *, signer: Signer | None = None) -> dict[str, Any]:
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
        preset = [k for k in (*CHAIN_FIELDS, "signer", "signature") if k in entry]
        if preset:
            raise LedgerError(f"{self.path}: entry must not carry {preset}; the ledger sets them")
        with exclusive_lock(self._lock_path):  # a sibling file: the ledger is replaced by rename
            data, parsed = self._read()
            stored = dict(entry)
            if stored.get("written_at") is None:
                stored["written_at"] = utc_now()
            stored["seq"] = parsed.report.n_entries + 1
            stored["prev_hash"] = parsed.report.last_hash
            if signer is not None:  # authorship: a re-hashed chain without the bank's key fails the audit
                stored["signer"] = signer[0]
            stored["hash"] = entry_hash(stored)
            if signer is not None:
                stored["signature"] = signer[1](signed_message(str(stored.get("bank_id")), stored["hash"])).hex()
            line = (canonical_json(stored) + "\n").encode("utf-8")
            atomic_write_bytes(self.path, data + line)
        return stored


# ---------------------------------------------------------------------------------------------
# The typed bank entry: the one schema the bank's writer and the auditor's verifier share
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BankEntry:
    """A bank's ledger entry for one round: every field the audit re-derives epsilon from.

    `Ledger.append` adds `written_at`, `seq`, `prev_hash` and `hash`. Numbers are plain JSON
    numbers; `history` is the accountant's full history [[sigma, q, steps], ...].
    """

    schema: str
    job_id: str
    bank_id: str
    round: int
    status: str  # one of ROUND_STATUSES
    reason: str
    started_at: str | None
    # the mechanism of this round (planned for a refusal; None when unknown)
    noise_multiplier: float | None
    sample_rate: float | None
    local_steps: int | None
    steps_run: int
    clip_norm: float
    expected_batch_size: int
    n_samples: int
    privacy_unit: str
    poisson_sampling: bool
    secure_mode: bool
    noise_source: str  # one of NOISE_SOURCES: "seeded" is predictable noise (the audit fails it)
    grad_sample_mode: str
    dataset_fingerprint: str  # SHA-256 over the sorted set of record digests (order/duplicate/unit-free)
    customer_ids: bool  # the data has a customer_id column: "record" then only by an explicit policy line
    dataset_id: str  # the dataset identity whose lifetime budget this ledger holds (the ledger's folder)
    policy_hash: str  # content hash of the bank's policy file in force (BankPolicy.content_hash)
    policy_overrides: dict  # node-config values applied over it (each may only tighten it)
    # what the job asked for (run-config names); the entry's own values are the bank's, within its
    # policy: a refused request never writes the server's numbers into the bank's record (issue 27)
    requested: dict
    released_metrics: list  # the plain (not DP-protected) metrics its replies carry under its policy
    # accounting, at the bank's delta
    accountant: str
    delta: float
    history: list
    epsilon: float
    epsilon_before: float
    epsilon_spent_this_round: float
    epsilon_prv: float | None  # null when Opacus' PRV could not be computed (RDP banks)
    epsilon_pld: float
    epsilon_replace_one: float | None  # the same history under replace-one adjacency (n public), PLD
    epsilon_next_round: float | None
    budget_epsilon: float
    versions: dict

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields `Ledger.append` adds to every entry, with the JSON types they must have.
APPENDED_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {"written_at": ((str,), False)}
SIGNATURE_FIELDS = ("signer", "signature")  # added by a signing bank; their absence is an audit finding


def _json_types(annotation: Any) -> tuple[tuple[type, ...], bool]:
    """(allowed JSON value types, None allowed) for a BankEntry field annotation."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    nullable = type(None) in args
    allowed: list[type] = []
    for arg in args:
        if arg is float:
            allowed += [int, float]  # JSON has one number type
        elif arg is not type(None):
            allowed.append(arg)
    return tuple(allowed), nullable


def bank_entry_fields() -> dict[str, tuple[tuple[type, ...], bool]]:
    """Field -> (allowed JSON types, nullable) of a stored bank entry, derived from BankEntry."""
    hints = typing.get_type_hints(BankEntry)
    out = {f.name: _json_types(hints[f.name]) for f in dataclasses.fields(BankEntry)}
    return {**out, **APPENDED_FIELDS}


def is_json_type(value: Any, allowed: tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not an int (JSON true is not 1)."""
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, allowed)


COMMITMENT_FIELDS = ("job_id", "bank_id", "round", "status", "seq", "prev_hash", "hash")


def commitment_of(entry: Mapping[str, Any], *, exhausted: bool) -> dict[str, Any]:
    """What a bank sends the server about its ledger entry: ids, status, chain position and hash.

    Not the entry itself: that carries n, q, sigma and epsilon, from which the dataset size
    follows. The hash binds the bank to the full entry (the audit compares it with the bank's
    ledger); `exhausted` is the bank's own verdict that its next round would not fit its budget.
    """
    signature = {k: entry[k] for k in SIGNATURE_FIELDS if k in entry}  # the mirror keeps the bank's signature
    return {**{k: entry[k] for k in COMMITMENT_FIELDS}, **signature, "exhausted": bool(exhausted)}


def check_commitment(
    raw: Any, *, bank_id: str | None = None, round: int | None = None, job_id: str | None = None
) -> dict[str, Any]:
    """Checks a commitment (dict or JSON text) before the server mirrors it; names the field."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise LedgerError(f"ledger commitment: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(raw, dict):
        raise LedgerError(f"ledger commitment: expected a JSON object, got {type(raw).__name__}")
    where = f"ledger commitment of {raw.get('bank_id')!r} round {raw.get('round')!r}"
    expected_keys = {*COMMITMENT_FIELDS, "exhausted"}
    if not expected_keys <= set(raw) <= expected_keys | set(SIGNATURE_FIELDS):
        raise LedgerError(f"{where}: fields expected {sorted(expected_keys)} (+ signer, signature), got {sorted(raw)}")
    if isinstance(raw["seq"], bool) or not isinstance(raw["seq"], int) or raw["seq"] < 1:
        raise LedgerError(f"{where}: field 'seq' expected an integer >= 1, got {raw['seq']!r}")
    for name in ("prev_hash", "hash"):
        if not (isinstance(raw[name], str) and re.fullmatch(r"[0-9a-f]{64}", raw[name])):
            raise LedgerError(f"{where}: field {name!r} expected 64 hex digits, got {raw[name]!r}")
    if raw["status"] not in ROUND_STATUSES or not isinstance(raw["exhausted"], bool):
        raise LedgerError(f"{where}: fields 'status'/'exhausted' expected a round status / a bool")
    for name, expected in (("bank_id", bank_id), ("round", round), ("job_id", job_id)):
        if expected is not None and raw.get(name) != expected:
            raise LedgerError(f"{where}: field {name!r} expected {expected!r}, got {raw.get(name)!r}")
    return raw


def mirror_entry(
    *,
    job_id: str,
    bank_id: str,
    round: int,
    server_status: ServerStatus,
    commitment: Mapping[str, Any] | None,
    reason: str = "",
    received_at: str | None = None,
) -> dict[str, Any]:
    """A server mirror line: the bank's commitment to its entry (verbatim) and what the server did.

    Raises:
        LedgerError: unknown status, "received" without a commitment, or a commitment that
            fails `check_commitment`.
    """
    if server_status not in SERVER_STATUSES:
        raise LedgerError(
            f"mirror entry for bank {bank_id!r} round {round}: server_status expected one of "
            f"{list(SERVER_STATUSES)}, got {server_status!r}"
        )
    if server_status == "received" and commitment is None:
        raise LedgerError(f"mirror entry for bank {bank_id!r} round {round}: 'received' needs the bank's commitment")
    checked = None if commitment is None else check_commitment(commitment, bank_id=bank_id, round=round, job_id=job_id)
    return {
        "schema": MIRROR_SCHEMA,
        "job_id": job_id,
        "bank_id": bank_id,
        "round": round,
        "server_status": server_status,
        "reason": reason,
        "received_at": received_at or utc_now(),
        "commitment": checked,
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


def bank_exhausted(entry: Mapping[str, Any] | None) -> bool:
    """Whether a bank's entry says it cannot take one more round within its budget.

    The bank's own test (`check_budget`: refuse when after > budget): `epsilon_next_round` is
    what one more identical round would reach by its accountant. A "refused" entry is exhausted
    whatever its numbers; NaN or inf is exhausted (conservative).
    """
    if entry is None:
        return False
    if entry.get("status") == "refused":
        return True
    nxt, budget = entry.get("epsilon_next_round"), entry.get("budget_epsilon")
    if not isinstance(nxt, (int, float)) or not isinstance(budget, (int, float)):
        return False
    return not (math.isfinite(nxt) and nxt <= budget)
