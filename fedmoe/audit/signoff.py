"""A privacy officer's sign-off of an audit report: who, when, what exactly, signed with Ed25519.

    python -m fedmoe.audit --sign-off NAME [--officer-key PATH] [--sign-off-failed] --out DIR LEDGER...
    python -m fedmoe.audit --verify-sign-off DIR [--officer-public-key HEX] [LEDGER...]

`sign_off(dir, ...)` writes `<dir>/signoff.json` next to the report:

    {"signed": {"type": "fedmoe.audit.signoff/1", "officer", "signed_at" (UTC), "verdict"
                ("passed"/"failed"), "statement" (one sentence), "jobs", "report": {file, sha256},
                "findings": {file, sha256}, "ledgers": [{path, kind, bank_ids, entries, chain_ok,
                head_hash}], "public_key" (hex)},
     "signature": hex Ed25519 signature over the canonical JSON of "signed"}

It signs what is on disk: findings.json (the verdict, the files and their head hashes) and the
SHA-256 of report.html, after checking that the two belong together. A FAILED audit is signed only
with `allow_failed` (the statement then says "failed"). The officer's key is a `fedmoe.crypto.identity`
key file (mode 0600, generated on first use); its public key is in the sign-off, and whoever
relies on the sign-off should compare it with the officer's key known out of band
(`--officer-public-key`). `verify_sign_off` checks the signature, that report.html and
findings.json still hash to the signed values and, given ledgers, that their heads are the signed
ones (a ledger that grew or was rewritten since the sign-off).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedmoe.audit.report import FINDINGS_FILE, REPORT_FILE, sha256_of
from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import Identity, generate_identity, load_identity
from fedmoe.protocol.files import atomic_write_bytes, read_document
from fedmoe.protocol.ledger import canonical_json, read_verified

SIGNOFF_FILE = "signoff.json"
SIGNOFF_TYPE = "fedmoe.audit.signoff/1"
log = logging.getLogger(__name__)


class SignOffError(ValueError):
    """A sign-off that cannot be made or does not verify; names the file, expected vs got."""


def default_officer_key() -> Path:
    return Path.home() / ".fedmoe" / "audit-officer.identity.secret"


def officer_identity(path: str | os.PathLike[str], officer: str) -> Identity:
    """The officer's Ed25519 key: loaded from `path`, or generated there (mode 0600) if missing.

    Raises:
        SignOffError: the key file is unreadable, too open, or was made for another officer.
    """
    path = Path(path)
    try:
        if not path.exists():
            identity = generate_identity(path, officer)
            log.warning("generated officer key %s (public key %s)", path, identity.public_key.hex())
            return identity
        identity = load_identity(path)
    except CryptoError as err:
        raise SignOffError(f"officer key {path}: {err}") from None
    if identity.bank_id != officer:
        raise SignOffError(f"officer key {path}: made for {identity.bank_id!r}, got --sign-off {officer!r}")
    return identity


def _statement(findings: dict[str, Any], officer: str, report_sha256: str, findings_sha256: str) -> dict[str, Any]:
    verdict = "passed" if findings.get("passed") is True else "failed"
    jobs = sorted({j for f in findings.get("files", []) for j in f.get("job_ids", [])})
    return {
        "type": SIGNOFF_TYPE,
        "officer": officer,
        "signed_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "verdict": verdict,
        "statement": f"I, {officer}, have reviewed the privacy audit report {REPORT_FILE} (SHA-256 "
        f"{report_sha256}) of job(s) {', '.join(jobs) or '-'} and sign it off as {verdict}.",
        "jobs": jobs,
        "report": {"file": REPORT_FILE, "sha256": report_sha256},
        "findings": {"file": FINDINGS_FILE, "sha256": findings_sha256},
        "ledgers": [
            {k: f.get(k) for k in ("path", "kind", "bank_ids", "entries_verified", "chain_ok", "head_hash")}
            for f in findings.get("files", [])
        ],
    }


def sign_off(
    report_dir: str | os.PathLike[str],
    *,
    officer: str,
    key_path: str | os.PathLike[str],
    allow_failed: bool = False,
) -> Path:
    """Signs the report in `report_dir` (report.html + findings.json) and writes signoff.json.

    Args:
        report_dir: a folder written by `fedmoe.audit.report.write_report`.
        officer: who signs (the name in the statement; the key file is made for this name).
        key_path: the officer's identity key file (generated, mode 0600, if missing).
        allow_failed: sign a FAILED audit too (the statement says "failed").

    Returns:
        The path of signoff.json.

    Raises:
        SignOffError: missing or mismatched report files, a failed audit without `allow_failed`,
            or an unusable key file.
    """
    folder = Path(report_dir)
    if not officer.strip():
        raise SignOffError("--sign-off: expected the officer's name, got an empty string")
    findings = read_document(folder / FINDINGS_FILE, SignOffError)
    report_sha256 = sha256_of(folder / REPORT_FILE) if (folder / REPORT_FILE).exists() else None
    if report_sha256 is None:
        raise SignOffError(f"{folder / REPORT_FILE}: not found")
    listed = (findings.get("report") or {}).get("sha256")
    if listed != report_sha256:
        raise SignOffError(
            f"{folder / FINDINGS_FILE}: report.sha256 expected {report_sha256} (report.html), got {listed!r}: "
            "the two files are not from the same audit run"
        )
    if findings.get("passed") is not True and not allow_failed:
        raise SignOffError(
            f"{folder / FINDINGS_FILE}: the audit FAILED; refusing to sign off (pass --sign-off-failed to sign it "
            "off as failed)"
        )
    identity = officer_identity(key_path, officer)
    signed = _statement(findings, officer, report_sha256, sha256_of(folder / FINDINGS_FILE))
    signed["public_key"] = identity.public_key.hex()
    signature = identity.sign(canonical_json(signed).encode("utf-8"))
    document = {"signed": signed, "signature": signature.hex()}
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_bytes(folder / SIGNOFF_FILE, text.encode("utf-8"))


@dataclass(frozen=True)
class SignOffCheck:
    """The outcome of `verify_sign_off`: ok when `problems` is empty."""

    signed: dict[str, Any]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_signature(path: Path, document: Any, public_key: str | None) -> dict[str, Any]:
    """The signed statement, after its signature verified; raises SignOffError otherwise."""
    if not isinstance(document, dict) or not isinstance(document.get("signed"), dict):
        raise SignOffError(f"{path}: expected {{'signed': {{...}}, 'signature': hex}}, got {str(document)[:80]}")
    signed = document["signed"]
    if signed.get("type") != SIGNOFF_TYPE:
        raise SignOffError(f"{path}: field 'signed.type' expected {SIGNOFF_TYPE!r}, got {signed.get('type')!r}")
    key_hex = signed.get("public_key")
    if public_key is not None and key_hex != public_key.lower():
        raise SignOffError(f"{path}: signed by public key {key_hex}, expected the officer's key {public_key}")
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(key_hex)))
        key.verify(bytes.fromhex(str(document.get("signature"))), canonical_json(signed).encode("utf-8"))
    except (InvalidSignature, ValueError, TypeError):
        raise SignOffError(
            f"{path}: the signature does not verify under public key {key_hex}: the sign-off was altered"
        ) from None
    return signed


def _ledger_problems(signed: dict[str, Any], ledgers: list[Path]) -> list[str]:
    by_path = {entry.get("path"): entry for entry in signed.get("ledgers", [])}
    problems = []
    for ledger in ledgers:
        entry = by_path.get(str(ledger.absolute()))
        if entry is None:
            problems.append(f"{ledger.absolute()}: not one of the ledgers this sign-off covers")
            continue
        chain, _ = read_verified(ledger)
        if chain.last_hash != entry.get("head_hash") or chain.n_entries != entry.get("entries_verified"):
            problems.append(
                f"{ledger.absolute()}: head hash expected {entry.get('head_hash')} after "
                f"{entry.get('entries_verified')} entries (signed), got {chain.last_hash} after {chain.n_entries}: "
                "the ledger changed since the sign-off"
            )
    return problems


def verify_sign_off(
    report_dir: str | os.PathLike[str],
    *,
    public_key: str | None = None,
    ledgers: list[str | os.PathLike[str]] = (),
) -> SignOffCheck:
    """Checks `<report_dir>/signoff.json`: its signature, and that the files it covers are unchanged.

    Args:
        report_dir: the folder holding report.html, findings.json and signoff.json.
        public_key: the officer's public key (hex) known out of band; None trusts the one inside.
        ledgers: ledger files to compare with the signed head hashes (optional).

    Returns:
        SignOffCheck (`problems` names each file that no longer matches, expected vs got).

    Raises:
        SignOffError: signoff.json is missing, malformed or its signature does not verify.
    """
    folder = Path(report_dir)
    path = folder / SIGNOFF_FILE
    signed = _check_signature(path, read_document(path, SignOffError), public_key)
    problems = []
    for what in ("report", "findings"):
        name, expected = (signed.get(what) or {}).get("file"), (signed.get(what) or {}).get("sha256")
        target = folder / str(name)
        got = sha256_of(target) if target.is_file() else "missing"
        if got != expected:
            problems.append(f"{target}: SHA-256 expected {expected} (signed), got {got}: changed after the sign-off")
    problems += _ledger_problems(signed, [Path(p) for p in ledgers])
    return SignOffCheck(signed, tuple(problems))
