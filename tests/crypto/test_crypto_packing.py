"""Packing: flat float32 update <-> bundle; layout, header, precision, input validation."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from crypto_helpers import LAYOUT, ROUND, expected_for, make_updates

from fedmoe.crypto import CryptoError, decrypt_bundle, decrypt_mean, encrypt_update, load_secret_context, parse_bundle
from fedmoe.crypto.packing import n_chunks_for

SLOTS = 4096  # N/2 at the default N=8192


@pytest.mark.parametrize("n", [1, SLOTS - 1, SLOTS, 2 * SLOTS + 7])  # weight alone in the last chunk when n = SLOTS
def test_round_trip_keeps_count_and_order(n: int, secret_key, public_key) -> None:
    # Distinct, ordered values: any permutation or shift of elements would show up as a large error.
    x = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    w = 37.0
    bundle = encrypt_update(x, weight=w, key=public_key, round=ROUND, layout_hash=LAYOUT, bank_id="bank0")
    header, values = decrypt_bundle(bundle, secret_key, expected=expected_for(secret_key, n))
    assert header.n_elements == n and values.shape == (n + 1,)
    assert header.n_chunks == n_chunks_for(n, SLOTS) == -(-(n + 1) // SLOTS)
    np.testing.assert_allclose(values[:n], w * x.astype(np.float64), rtol=0, atol=1e-6)
    assert abs(values[n] - w) < 1e-6  # the weight slot follows the last element
    mean, total = decrypt_mean(bundle, secret_key)
    assert mean.dtype == np.float32 and mean.shape == (n,)
    assert np.abs(mean - x).max() < 1e-6
    assert abs(total - w) < 1e-6


def test_header_describes_the_bundle(public_key) -> None:
    n = SLOTS + 10
    x = np.zeros(n, np.float32)
    bundle = encrypt_update(x, weight=5.0, key=public_key, round=7, layout_hash=LAYOUT, bank_id="bank-a")
    header, chunks = parse_bundle(bundle)
    assert (header.kind, header.bank_id, header.contributors) == ("update", "bank-a", ("bank-a",))
    assert (header.key_id, header.epoch, header.round) == (public_key.key_id, 1, 7)
    assert (header.n_elements, header.n_chunks, header.slots_per_chunk) == (n, 2, SLOTS)
    assert header.layout_hash == LAYOUT
    assert len(chunks) == 2
    assert list(header.chunk_sha256) == [hashlib.sha256(c).hexdigest() for c in chunks]
    assert list(header.chunk_sizes) == [len(c) for c in chunks]
    # ~57.6 bytes per float at N=8192, [60, 40, 60] (two 8192-coefficient polys over 100 bits, zstd)
    per_float = sum(header.chunk_sizes) / (header.n_chunks * SLOTS)
    assert 50 < per_float < 66


def test_weights_in_the_thousands_keep_precision(secret_key, public_key) -> None:
    """CKKS noise is absolute (~1e-9..3e-8 per summed value), so the mean's error shrinks with the
    total weight: raw sample counts in the thousands are more precise than normalised fractions."""
    n = 2000
    updates, _ = make_updates(5, n, seed=1, scale=1e-2)
    errors = {}
    for w_scale in (1e-3, 1.0, 1e3):
        weights = [w_scale * w for w in (1, 3, 5, 7, 9)]
        total = None
        for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
            b = encrypt_update(u, weight=w, key=public_key, round=ROUND, layout_hash=LAYOUT, bank_id=f"b{i}")
            _, values = decrypt_bundle(b, secret_key)
            total = values if total is None else total + values  # plaintext stand-in for the server sum
        mean = total[:n] / total[n]
        ref = sum(w * u.astype(np.float64) for u, w in zip(updates, weights, strict=True)) / sum(weights)
        errors[w_scale] = float(np.abs(mean - ref).max())
    assert errors[1e3] < 1e-10
    assert errors[1.0] < 1e-7
    assert errors[1e3] < errors[1.0] < errors[1e-3]


@pytest.mark.parametrize(
    ("update", "weight", "match"),
    [
        (np.ones(4, np.float64), 1.0, "float32"),
        (np.ones((2, 2), np.float32), 1.0, "1-D"),
        (np.ones(0, np.float32), 1.0, "non-empty"),
        (np.array([1.0, np.nan], np.float32), 1.0, r"update\[1\] = nan"),
        (np.ones(4, np.float32), 0.0, "weight"),
        (np.ones(4, np.float32), -3.0, "weight"),
        (np.ones(4, np.float32), float("inf"), "weight"),
        (np.full(4, 1e30, np.float32), 1.0, "headroom"),
    ],
)
def test_encrypt_rejects_bad_input(update: np.ndarray, weight: float, match: str, public_key) -> None:
    with pytest.raises(CryptoError, match=match):
        encrypt_update(update, weight=weight, key=public_key, round=ROUND, layout_hash=LAYOUT, bank_id="b")


def test_encrypt_rejects_bad_ids(public_key) -> None:
    x = np.ones(3, np.float32)
    with pytest.raises(CryptoError, match="layout_hash"):
        encrypt_update(x, weight=1.0, key=public_key, round=ROUND, layout_hash="", bank_id="b")
    with pytest.raises(CryptoError, match="round"):
        encrypt_update(x, weight=1.0, key=public_key, round=-1, layout_hash=LAYOUT, bank_id="b")


def test_decrypt_checks_key_and_expectations(secret_key, public_key, other_key_files) -> None:
    bundle = encrypt_update(
        np.ones(3, np.float32), weight=1.0, key=public_key, round=ROUND, layout_hash=LAYOUT, bank_id="b"
    )
    other = load_secret_context(other_key_files.secret_path)
    with pytest.raises(CryptoError, match="key id expected") as e:
        decrypt_mean(bundle, other)
    assert e.value.reason == "key_id"
    with pytest.raises(CryptoError, match="round expected 4, got 3"):
        decrypt_mean(bundle, secret_key, expected=expected_for(secret_key, 3, round=4))


@pytest.mark.parametrize("blob", [b"", b"FMCKKSB1", b"FMCKKSB1\x00\x00\x00\x05{bad}", b"random bytes" * 10])
def test_parse_rejects_garbage(blob: bytes) -> None:
    with pytest.raises(CryptoError) as e:
        parse_bundle(blob)
    assert e.value.reason == "deserialize"
