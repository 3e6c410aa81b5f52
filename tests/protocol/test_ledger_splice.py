"""A spliced ledger (issue 32): a line lifted from another chain of the same bank, with its own hash,
seq and signature all valid, must break the chain at that line, for verify_chain and for the audit.

The older tests edit, delete or move lines, which a check on `hash` or `seq` alone already catches;
only a line whose `prev_hash` points elsewhere tries the link between lines.
"""

from __future__ import annotations

import json
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
    first = read_verified(tmp_path / "ours.jsonl")[1][0]["hash"]
    assert not report.ok and report.first_bad_line == 2
    assert report.problem == (
        f"field 'prev_hash': expected {first[:16]}... (hash of line 1), got {lifted['prev_hash'][:16]}... "
        "(a line before it was deleted, inserted or edited)"
    )
    assert read_verified(spliced)[0] == report and report.path == spliced
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


# ---------------------------------------------------------------------------------------------
# Every other rule of the chain, each on its own, on small signed chains (no training: `make mutation`
# runs these per mutant of `_parse_chain`)
# ---------------------------------------------------------------------------------------------


def rewrite(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(lines))
    return path


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda line: b"[1, 2]\n", "expected a JSON object, got list"),
        (lambda line: b"{not json\n", "not valid JSON"),
        (lambda line: b"\xff\xfe\n", "not valid JSON"),
        (lambda line: line.replace(b'"seq":2,', b""), "missing chain field(s) ['seq']"),
        (lambda line: line.replace(b'"hash":"', b'"hash_":"'), "missing chain field(s) ['hash']"),
        (
            lambda line: line.replace(b'"note":"a2"', b'"note": "a2"'),
            "line is not in canonical JSON form (edited by hand?)",
        ),
        (lambda line: line.replace(b'"note":"a2"', b'"note":NaN'), "ledger entry is not canonical JSON"),
        (lambda line: line.replace(b'"seq":2', b'"seq":3'), "field 'seq': expected 2, got 3"),
        (lambda line: line.replace(b'"note":"a2"', b'"note":"a9"'), "field 'hash': expected"),
    ],
)
def test_each_broken_rule_names_the_second_line(tmp_path, identity, damage, problem):
    ours = write_chain(tmp_path / "ours.jsonl", identity, ["a1", "a2", "a3"])
    path = rewrite(tmp_path / "broken.jsonl", [ours[0], damage(ours[1]), ours[2]])
    report = verify_chain(path)
    assert (report.ok, report.first_bad_line, report.n_entries) == (False, 2, 1), report
    assert report.problem.startswith(problem), report.problem
    if "field 'hash'" in problem:  # both hashes named, 16 hex digits each
        entry = json.loads(damage(ours[1]))
        assert report.problem == (
            f"field 'hash': expected {entry_hash(entry)[:16]}... for the line's content, got "
            f"{entry['hash'][:16]}... (the line was edited)"
        )
    assert report.describe() == f"{path}:2: {report.problem}"
    assert [e["note"] for e in read_verified(path)[1]] == ["a1"]


def test_a_torn_last_line_an_empty_file_and_a_missing_one(tmp_path, identity):
    ours = write_chain(tmp_path / "ours.jsonl", identity, ["a1", "a2"])
    torn = rewrite(tmp_path / "torn.jsonl", [ours[0], ours[1][:-1]])
    report = verify_chain(torn)
    assert (report.ok, report.first_bad_line, report.n_entries) == (False, 2, 0)  # refused before any line is read
    assert report.problem == "incomplete last line (no newline): a write was cut off or the file was edited"
    empty = rewrite(tmp_path / "empty.jsonl", [])
    assert verify_chain(empty) == verify_chain(empty) and verify_chain(empty).ok
    assert (verify_chain(empty).n_entries, verify_chain(empty).last_hash) == (0, GENESIS_HASH)
    assert read_verified(empty)[1] == []
    assert verify_chain(empty).path == empty and read_verified(empty)[0].path == empty
    none = tmp_path / "none.jsonl"
    for report in (verify_chain(none), read_verified(none)[0]):
        assert (report.path, report.ok, report.n_entries, report.first_bad_line) == (none, False, 0, 0)
        assert report.problem == "file not found"
    assert read_verified(tmp_path / "none.jsonl")[1] == []
    good = verify_chain(tmp_path / "ours.jsonl")
    assert good.describe() == f"{tmp_path / 'ours.jsonl'}: chain ok, 2 entries"
    assert good.last_hash == read_verified(tmp_path / "ours.jsonl")[1][-1]["hash"]


def test_the_hash_covers_everything_but_hash_and_signature_and_the_signed_message_names_the_bank():
    entry = {"seq": 1, "prev_hash": GENESIS_HASH, "bank_id": BANK, "x": [1, 2.5, "é"]}
    digest = entry_hash(entry)
    assert digest == entry_hash({**entry, "hash": "h", "signature": "s"})
    assert len(digest) == 64 and digest != entry_hash({**entry, "signer": "k"})
    assert digest != entry_hash({**entry, "x": [1, 2.5, "e"]})
    assert signed_message(BANK, digest) == f"fedmoe.ledger.entry/1|{BANK}|{digest}".encode()
