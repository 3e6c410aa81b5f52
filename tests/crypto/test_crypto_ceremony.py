"""Separate-host BFV key ceremony: the secret key travels sealed to each bank's identity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from crypto_helpers import path_mode

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.secagg.bfv import encrypt_residues, load_bfv_public
from fedmoe.crypto.secagg.bfv_secret import bfv_keygen, decrypt_residues
from fedmoe.crypto.secagg.ceremony import KeyDelivery, KeyRequest, accept_key, deliver_key, request_key


def test_key_reaches_each_bank_sealed_and_signed(tmp_path: Path, identities) -> None:
    ids, pins = identities
    dealer, bank = ids[0], ids[1]
    files = bfv_keygen(tmp_path / "dealer")  # on the dealer's host; the public file goes to the server
    request, eph = request_key(bank, "job-1")
    request = KeyRequest.from_bytes(request.to_bytes())  # relayed by the server
    delivery = KeyDelivery.from_bytes(deliver_key(dealer, pins, request, files.secret_path).to_bytes())
    assert b"FMBFVKY1" not in delivery.to_bytes()  # the server relays ciphertext only
    out = tmp_path / "bank1" / "context.secret.bfv"
    key = accept_key(bank, pins, request, eph, delivery, out, dealer="bank0")
    assert path_mode(out) == 0o600 and key.key_id == files.key_id and key.is_private()
    public = load_bfv_public(files.public_path)  # the server encrypts, the bank decrypts
    r = np.arange(10, dtype=np.uint64)
    bundle = encrypt_residues(r, public, kind="sum", job_id="job-1", round=1, bank_id=None)
    assert np.array_equal(decrypt_residues(bundle, key)[1], r)


def test_bad_deliveries_are_refused(tmp_path: Path, identities) -> None:
    ids, pins = identities
    dealer, bank, other = ids[0], ids[1], ids[2]
    files = bfv_keygen(tmp_path / "dealer")
    request, eph = request_key(bank, "job-1")
    delivery = deliver_key(dealer, pins, request, files.secret_path)
    out = tmp_path / "k"
    cases = {
        "inconsistent": (dict(dealer="bank2"), {}),  # the bank expects another dealer
        "signature": ({}, dict(ciphertext=bytes(len(delivery.ciphertext)))),  # altered in transit
    }
    for reason, (kw, change) in cases.items():
        with pytest.raises(CryptoError) as e:
            accept_key(
                bank, pins, request, eph, dataclasses.replace(delivery, **change), out, **({"dealer": "bank0"} | kw)
            )
        assert e.value.reason == reason
    # a delivery made for another bank's request does not open for this one
    req2, _ = request_key(other, "job-1")
    with pytest.raises(CryptoError) as e:
        accept_key(bank, pins, request, eph, deliver_key(dealer, pins, req2, files.secret_path), out, dealer="bank0")
    assert e.value.reason == "inconsistent"
    # an unsigned (forged) request gets nothing
    with pytest.raises(CryptoError) as e:
        deliver_key(dealer, pins, dataclasses.replace(request, ephemeral_pk=bytes(32)), files.secret_path)
    assert e.value.reason == "signature"
    assert not out.exists()
