"""Bank identities: Ed25519 keys on disk, pins, generic sign/verify."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from crypto_helpers import path_mode

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import ConsortiumPins, generate_identity, load_identity, load_pins, write_pins


def test_identity_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "bank-a.identity.secret"
    ident = generate_identity(path, "bank-a")
    assert path_mode(path) == 0o600 and path_mode(path.parent) & 0o077 == 0
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    loaded = load_identity(path)
    assert loaded.bank_id == "bank-a" and loaded.public_key == ident.public_key
    assert "Ed25519" not in repr(loaded) and len(loaded.sign(b"x")) == 64
    with pytest.raises(CryptoError, match="already exists"):
        generate_identity(path, "bank-a")


def test_loader_refuses_readable_or_corrupted_files(tmp_path: Path) -> None:
    path = tmp_path / "id.secret"
    generate_identity(path, "bank-a")
    os.chmod(path, 0o644)
    with pytest.raises(CryptoError, match="mode 0644"):
        load_identity(path)
    os.chmod(path, 0o600)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # another private key than the header's public key
    path.write_bytes(bytes(data))
    with pytest.raises(CryptoError, match="does not match"):
        load_identity(path)
    path.write_bytes(b"junk")
    with pytest.raises(CryptoError, match="magic"):
        load_identity(path)
    with pytest.raises(CryptoError, match="not found"):
        load_identity(tmp_path / "missing")


def test_sign_and_verify_against_pins(tmp_path: Path) -> None:
    a = generate_identity(tmp_path / "a", "bank-a")
    b = generate_identity(tmp_path / "b", "bank-b")
    pins = ConsortiumPins.from_identities([a, b])
    sig = a.sign(b"ledger entry 7")
    pins.verify("bank-a", b"ledger entry 7", sig)
    assert pins.is_valid("bank-a", b"ledger entry 7", sig)
    for bank, data, reason in [
        ("bank-a", b"ledger entry 8", "signature"),  # other data
        ("bank-b", b"ledger entry 7", "signature"),  # claims to be another bank
        ("bank-z", b"ledger entry 7", "unknown_bank"),  # not pinned
    ]:
        with pytest.raises(CryptoError) as e:
            pins.verify(bank, data, sig)
        assert e.value.reason == reason
    assert not pins.is_valid("bank-a", b"x", b"short")


def test_pins_file_round_trip(tmp_path: Path) -> None:
    ids = [generate_identity(tmp_path / f"{i}", f"bank{i}") for i in range(3)]
    pins = ConsortiumPins.from_identities(ids)
    path = write_pins(tmp_path / "pins.json", pins)
    loaded = load_pins(path)
    assert loaded.banks == ("bank0", "bank1", "bank2") and dict(loaded.keys) == dict(pins.keys)
    path.write_text('{"format": 1, "banks": {"bank0": "zz"}}')
    with pytest.raises(CryptoError, match="hex"):
        load_pins(path)
    path.write_text('{"format": 1, "banks": {"bank0": "00"}}')
    with pytest.raises(CryptoError, match="32-byte"):
        load_pins(path)
    with pytest.raises(TypeError):
        pins.keys["bank9"] = b"\0" * 32  # type: ignore[index]  # pins are read-only


def test_cli_identity_pins_and_bfv_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedmoe.crypto.__main__ import main as cli_main
    from fedmoe.crypto.secagg.bfv import load_bfv_public

    lines = []
    for bank in ("bank-a", "bank-b"):
        assert cli_main(["identity", "--out", str(tmp_path / f"{bank}.id"), "--bank-id", bank]) == 0
        lines.append(capsys.readouterr().out.strip())
    assert path_mode(tmp_path / "bank-a.id") == 0o600
    assert cli_main(["pins", "--out", str(tmp_path / "pins.json"), *lines]) == 0
    pins = load_pins(tmp_path / "pins.json")
    assert pins.keys["bank-a"] == load_identity(tmp_path / "bank-a.id").public_key
    assert cli_main(["pins", "--out", str(tmp_path / "p2.json"), "bank-a"]) == 1
    assert cli_main(["bfv-keygen", "--out", str(tmp_path / "bfv")]) == 0
    out = capsys.readouterr().out
    assert load_bfv_public(tmp_path / "bfv" / "context.public.bfv").key_id in out
    assert path_mode(tmp_path / "bfv" / "context.secret.bfv") == 0o600
