"""The audit CLI fails without pinned keys, and when a pinned bank's ledger is missing (issue 27).

On the old code a missing `--pins` was only a warning (a ledger re-hashed and re-signed with an
attacker's own key passed, rc 0), and with `--pins` listing bank-0 and no server mirrors given, a
deleted bank-0 ledger passed.
"""

from __future__ import annotations

from fedmoe.audit.__main__ import main
from fedmoe.crypto.identity import ConsortiumPins, generate_identity, write_pins
from tests.audit.test_audit_policy import plant


def consortium(tmp_path, *banks):
    identities = [generate_identity(tmp_path / f"{b}.secret", b) for b in banks]
    return identities, write_pins(tmp_path / "pins.json", ConsortiumPins.from_identities(identities))


def test_without_pins_the_audit_fails_unless_no_pins_is_explicit(tmp_path, capsys):
    identities, _ = consortium(tmp_path, "bank-0")
    ledger = plant(tmp_path / "l.jsonl", (identities[0], None))
    assert main(["--out", str(tmp_path / "a"), str(ledger)]) == 1
    assert "no pinned consortium keys" in capsys.readouterr().out
    assert main(["--out", str(tmp_path / "b"), "--no-pins", str(ledger)]) == 0


def test_a_forged_ledger_signed_with_the_attackers_own_key_fails_against_the_pins(tmp_path):
    identities, pins = consortium(tmp_path, "bank-0")
    forger = generate_identity(tmp_path / "forger.secret", "bank-0")
    forged = plant(tmp_path / "forged.jsonl", (forger, None))
    assert main(["--out", str(tmp_path / "a"), "--no-pins", str(forged)]) == 0  # self-consistent only
    assert main(["--out", str(tmp_path / "b"), "--pins", str(pins), str(forged)]) == 1


def test_a_pinned_bank_without_a_ledger_fails_whatever_mirrors_are_given(tmp_path, capsys):
    identities, pins = consortium(tmp_path, "bank-0", "bank-1")
    ledger = plant(tmp_path / "bank-0.jsonl", (identities[0], None))
    assert main(["--out", str(tmp_path / "a"), "--pins", str(pins), str(ledger)]) == 1
    out = capsys.readouterr().out
    assert "missing-ledger" in out and "bank-1" in out


def test_an_audit_scoped_to_one_bank_needs_only_that_banks_ledger(tmp_path):
    identities, pins = consortium(tmp_path, "bank-0", "bank-1")
    ledger = plant(tmp_path / "bank-0.jsonl", (identities[0], None))
    assert main(["--out", str(tmp_path / "a"), "--pins", str(pins), "--bank", "bank-0", str(ledger)]) == 0
    assert main(["--out", str(tmp_path / "b"), "--pins", str(pins), "--bank", "bank-1", str(ledger)]) == 1
