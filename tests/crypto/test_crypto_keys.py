"""Key ceremony: files, modes, key ids, public vs secret contexts, the CLI."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from crypto_helpers import LAYOUT, path_mode

import fedmoe.crypto.keys
import fedmoe.protocol.files
from fedmoe.crypto import (
    CkksParams,
    CryptoError,
    ExpectedHeader,
    KeyFiles,
    aggregate,
    decrypt_mean,
    encrypt_update,
    key_id,
    keygen,
    load_public_context,
    load_secret_context,
)
from fedmoe.crypto.__main__ import main as cli_main


def test_keygen_writes_private_files_without_leftovers(key_files: KeyFiles) -> None:
    assert path_mode(key_files.secret_path) == 0o600  # never group/world-readable
    assert path_mode(key_files.public_path) == 0o600
    assert path_mode(key_files.secret_path.parent) & 0o077 == 0
    names = sorted(p.name for p in key_files.secret_path.parent.iterdir())
    assert names == ["context.public.ckks", "context.secret.ckks", "key.json"]  # no temp files left
    meta = json.loads(key_files.info_path.read_text())
    assert set(meta) == {"format", "key_id", "epoch", "params", "files"}  # ids and params only, no key material
    assert meta["key_id"] == key_files.info.key_id and meta["epoch"] == 1
    assert CkksParams.from_dict(meta["params"]) == CkksParams()


def test_public_context_cannot_decrypt(key_files: KeyFiles, secret_key, public_key) -> None:
    ctx = public_key.context
    assert not ctx.is_private() and not public_key.is_private()
    assert not ctx.has_secret_key()
    assert not ctx.has_galois_keys() and not ctx.has_relin_keys()
    assert key_files.public_path.stat().st_size < 500_000  # ~0.36 MB without Galois/relin keys
    # It can encrypt (public-key encryption) ...
    vec = ts.ckks_vector(ctx, [1.0, 2.0, 3.0])
    # ... but decryption raises, both through TenSEAL and through our API.
    with pytest.raises(ValueError, match="secret"):
        vec.decrypt()
    bundle = encrypt_update(
        np.ones(5, np.float32), weight=2.0, key=public_key, round=1, layout_hash=LAYOUT, bank_id="b"
    )
    with pytest.raises(CryptoError, match="public"):
        decrypt_mean(bundle, public_key)
    # The secret context of the same ceremony decrypts what the public one encrypted.
    mean, total = decrypt_mean(bundle, secret_key)
    np.testing.assert_allclose(mean, np.ones(5), atol=1e-6)
    assert abs(total - 2.0) < 1e-6


def test_key_ids_match_across_files(key_files: KeyFiles, secret_key, public_key, other_key_files: KeyFiles) -> None:
    assert secret_key.is_private()
    assert secret_key.key_id == public_key.key_id == key_files.info.key_id
    assert key_id(secret_key.context) == key_id(public_key.context)
    assert other_key_files.info.key_id != key_files.info.key_id
    assert len(key_files.info.key_id) == 32
    assert "Context object" not in repr(secret_key) and secret_key.key_id in repr(secret_key)


def test_loaders_refuse_the_wrong_kind(key_files: KeyFiles) -> None:
    with pytest.raises(CryptoError, match="expected a public context file.*server must mount only the public"):
        load_public_context(key_files.secret_path)
    with pytest.raises(CryptoError, match="expected a secret context file"):
        load_secret_context(key_files.public_path)
    with pytest.raises(CryptoError, match="not found"):
        load_public_context(key_files.public_path.with_name("missing.ckks"))


def test_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    files = keygen(tmp_path)
    os.chmod(files.secret_path, 0o644)
    with pytest.raises(CryptoError, match=r"mode 0644.*expected 0600"):
        load_secret_context(files.secret_path)
    os.chmod(files.secret_path, 0o400)  # read-only for the owner is fine
    assert load_secret_context(files.secret_path).is_private()


def test_corrupted_key_file_is_refused(tmp_path: Path) -> None:
    files = keygen(tmp_path)
    data = bytearray(files.public_path.read_bytes())
    data[-100] ^= 0xFF
    files.public_path.write_bytes(bytes(data))
    with pytest.raises(CryptoError, match="SHA-256 does not match"):
        load_public_context(files.public_path)
    files.public_path.write_bytes(b"not a key file")
    with pytest.raises(CryptoError, match="magic"):
        load_public_context(files.public_path)


def test_keygen_refuses_existing_keys_unless_overwrite(tmp_path: Path) -> None:
    first = keygen(tmp_path, epoch=1)
    with pytest.raises(CryptoError, match="already holds key files"):
        keygen(tmp_path, epoch=2)
    second = keygen(tmp_path, epoch=2, overwrite=True)
    assert second.info.key_id != first.info.key_id
    assert load_public_context(second.public_path).epoch == 2


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fedmoe.protocol.files.os, "replace", boom)  # the one atomic-write helper
    with pytest.raises(OSError, match="disk full"):
        keygen(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the key file nor its temp file


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale_bits": 25}, "scale_bits"),
        ({"poly_modulus_degree": 1000}, "poly_modulus_degree"),
        ({"coeff_mod_bit_sizes": (60, 60, 60, 60)}, "128-bit-security"),
        ({"coeff_mod_bit_sizes": (60,)}, "coeff_mod_bit_sizes"),
        ({"coeff_mod_bit_sizes": (40, 40), "scale_bits": 30}, "headroom"),
    ],
)
def test_params_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(CryptoError, match=match):
        CkksParams(**kwargs)


def test_keygen_rejects_bad_epoch(tmp_path: Path) -> None:
    with pytest.raises(CryptoError, match="epoch"):
        keygen(tmp_path, epoch=0)


def test_cli_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "job"
    assert cli_main(["keygen", "--out", str(out), "--epoch", "3"]) == 0
    printed = capsys.readouterr().out
    info = json.loads((out / "key.json").read_text())
    assert info["key_id"] in printed and info["epoch"] == 3
    assert len(printed) < 1000  # ids and paths, no key material
    assert path_mode(out / "context.secret.ckks") == 0o600

    assert cli_main(["keygen", "--out", str(out)]) == 1
    assert "already holds key files" in capsys.readouterr().err
    assert cli_main(["keygen", "--out", str(out), "--force", "--scale-bits", "20"]) == 1
    assert "scale_bits" in capsys.readouterr().err
    assert cli_main(["keygen", "--out", str(out), "--force"]) == 0


def test_cli_runs_as_module(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedmoe.crypto", "keygen", "--out", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(fedmoe.crypto.keys.__file__).resolve().parents[2],  # repo root, as `make test` runs it
    )
    assert proc.returncode == 0, proc.stderr
    assert "key id:" in proc.stdout


def test_logs_carry_ids_not_key_material(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="fedmoe.crypto"):
        files = keygen(tmp_path)
        secret = load_secret_context(files.secret_path)
        public = load_public_context(files.public_path)
        bundle = encrypt_update(
            np.ones(8, np.float32), weight=3.0, key=public, round=1, layout_hash=LAYOUT, bank_id="b"
        )
        expected = ExpectedHeader(public.key_id, public.epoch, 1, LAYOUT, 8)
        result = aggregate({"b": bundle, "c": b"junk"}, key=public, expected=expected)
        decrypt_mean(result.bundle, secret)
    assert files.info.key_id in caplog.text and "rejected bank 'c'" in caplog.text
    payload = files.secret_path.read_bytes()[-4096:]  # inside the serialized keys
    for probe in (payload[:24], payload[-24:]):
        assert repr(probe)[2:-1] not in caplog.text
        assert base64.b64encode(probe).decode()[:24] not in caplog.text
        assert probe.hex() not in caplog.text
