"""A spliced ledger (issue 32): a line lifted from another chain of the same bank, with its own hash,
seq and signature all valid, must break the chain at that line, for verify_chain and for the audit.

The older tests edit, delete or move lines, which a check on `hash` or `seq` alone already catches;
only a line whose `prev_hash` points elsewhere tries the link between lines.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmoe.audit.verify import audit_ledgers
from fedmoe.crypto.identity import ConsortiumPins, generate_identity
from fedmoe.protocol.ledger import GENESIS_HASH, Ledger, entry_hash, read_verified, signed_message, verify_chain

BANK = "bank-a"


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    return generate_identity(tmp_path_factory.mktemp("id") / f"{BANK}.secret", BANK)


def write_chain(path: Path, identity, notes: list[str]) -> list[bytes]:
    """A signed chain of one bank with one entry per note; returns its lines (newline included)."""
    ledger = Ledger(path)
    for i, note in enumerate(notes, start=1):
        ledger.append({"bank_id": BANK, "round": i, "note": note}, signer=(identity.public_key.hex(), identity.sign))
    return path.read_bytes().splitlines(keepends=True)


def test_a_spliced_line_with_valid_hash_seq_and_signature_breaks_the_chain(tmp_path, identity):
    ours = write_chain(tmp_path / "ours.jsonl", identity, ["a1", "a2", "a3"])
    theirs = write_chain(tmp_path / "theirs.jsonl", identity, ["b1", "b2", "b3"])
    spliced = tmp_path / "spliced.jsonl"
    spliced.write_bytes(ours[0] + theirs[1] + ours[2])
    # the lifted line is valid on its own: its seq fits, its hash is its content's, the bank signed it
    report, entries = read_verified(tmp_path / "theirs.jsonl")
    lifted = entries[1]
    assert lifted["seq"] == 2 and lifted["hash"] == entry_hash(lifted)
    pins = ConsortiumPins.from_identities([identity])
    assert pins.is_valid(BANK, signed_message(BANK, lifted["hash"]), bytes.fromhex(lifted["signature"]))
    report = verify_chain(spliced)
    assert not report.ok and report.first_bad_line == 2 and "prev_hash" in report.problem
    assert report.n_entries == 1 and report.last_hash == entry_hash(read_verified(tmp_path / "ours.jsonl")[1][0])
    _, prefix = read_verified(spliced)
    assert [e["note"] for e in prefix] == ["a1"]


def test_the_audit_reports_the_splice_at_its_line(tmp_path, identity):
    ours = write_chain(tmp_path / "ours.jsonl", identity, ["a1", "a2", "a3"])
    theirs = write_chain(tmp_path / "theirs.jsonl", identity, ["b1", "b2", "b3"])
    spliced = tmp_path / "spliced.jsonl"
    spliced.write_bytes(ours[0] + theirs[1] + ours[2])
    result = audit_ledgers([spliced], pins=ConsortiumPins.from_identities([identity]))
    chain = [f for f in result.errors if f.check == "chain"]
    assert [(f.path, f.line) for f in chain] == [(spliced, 2)] and "prev_hash" in chain[0].message
    assert not result.ok


def test_a_first_line_must_chain_to_genesis(tmp_path, identity):
    theirs = write_chain(tmp_path / "theirs.jsonl", identity, ["b1", "b2"])
    headless = tmp_path / "headless.jsonl"
    lifted = theirs[1].replace(b'"seq":2', b'"seq":1')  # seq fits again, but the hash no longer would
    headless.write_bytes(lifted)
    assert not verify_chain(headless).ok
    report = verify_chain(tmp_path / "theirs.jsonl")
    assert report.ok and report.n_entries == 2 and report.first_bad_line is None and report.problem == ""
    assert read_verified(tmp_path / "theirs.jsonl")[1][0]["prev_hash"] == GENESIS_HASH
