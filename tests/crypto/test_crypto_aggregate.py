"""Aggregation on ciphertexts with only the public context: weighted mean, validation, rejections."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Callable

import numpy as np
import pytest
import tenseal as ts
from crypto_helpers import LAYOUT, ROUND, encrypt_all, expected_for, make_updates, plain_weighted_mean

from fedmoe.crypto import (
    CkksKey,
    CryptoError,
    aggregate,
    decrypt_bundle,
    decrypt_mean,
    encrypt_update,
    load_public_context,
    load_secret_context,
    parse_bundle,
)
from fedmoe.crypto.packing import BundleHeader, pack_bundle

K = 5
N = 3 * 4096 + 5  # 4 chunks, the last one partly filled


@pytest.fixture(scope="module")
def server_key(key_files) -> CkksKey:
    """The server loads only the public file, and it provably cannot decrypt."""
    key = load_public_context(key_files.public_path)
    assert not key.context.is_private()
    with pytest.raises(ValueError):
        ts.ckks_vector(key.context, [1.0]).decrypt()
    return key


@pytest.fixture(scope="module")
def round_data(public_key) -> tuple[list[np.ndarray], list[float], dict[str, bytes]]:
    updates, weights = make_updates(K, N, seed=42)
    return updates, weights, encrypt_all(public_key, updates, weights)


def test_weighted_mean_matches_plaintext(round_data, server_key, secret_key) -> None:
    updates, weights, bundles = round_data
    expected = expected_for(server_key, N)
    result = aggregate(bundles, key=server_key, expected=expected)
    assert result.accepted == [f"bank{i}" for i in range(K)] and result.rejected == []
    mean, total = decrypt_mean(result.bundle, secret_key, expected=expected)
    assert mean.dtype == np.float32 and mean.shape == (N,)
    assert np.abs(mean - plain_weighted_mean(updates, weights)).max() < 1e-6
    assert abs(total - sum(weights)) < 1e-6
    header, _ = parse_bundle(result.bundle)
    assert header.kind == "sum" and header.bank_id is None and header.contributors == tuple(result.accepted)


def test_pairs_and_mapping_give_the_same_sum(round_data, server_key, secret_key) -> None:
    _, _, bundles = round_data
    expected = expected_for(server_key, N)
    a = aggregate(bundles, key=server_key, expected=expected)
    b = aggregate(list(bundles.items()), key=server_key, expected=expected)
    assert a.accepted == b.accepted
    # Ciphertext addition is exact modular arithmetic, so the same inputs give the same bytes.
    assert a.bundle == b.bundle


def _rewrite(bundle: bytes, *, chunks: list[bytes] | None = None, rehash: bool = True, **changes) -> bytes:
    """Re-pack a bundle with header changes and/or replaced chunks (hashes recomputed if rehash)."""
    header, old_chunks = parse_bundle(bundle)
    chunks = old_chunks if chunks is None else chunks
    fields = {"n_chunks": len(chunks), "chunk_sizes": tuple(len(c) for c in chunks)}
    if rehash:
        fields["chunk_sha256"] = tuple(hashlib.sha256(c).hexdigest() for c in chunks)
    fields.update(changes)
    return pack_bundle(dataclasses.replace(header, **fields), chunks)


def _raw_pack(header: BundleHeader, chunks: list[bytes], **overrides) -> bytes:
    """Pack without pack_bundle's consistency assert, to forge inconsistent headers."""
    hbytes = json.dumps(header.to_dict() | overrides).encode()
    return b"".join([b"FMCKKSB1", struct.pack(">I", len(hbytes)), hbytes, *chunks])


def _header_claims_more_chunks(bundle: bytes) -> bytes:
    header, chunks = parse_bundle(bundle)
    return _raw_pack(header, chunks, n_chunks=header.n_chunks + 1)


def _flip_byte(bundle: bytes) -> bytes:
    data = bytearray(bundle)
    data[-1000] ^= 0x01  # inside the last chunk; the header keeps the old hash
    return bytes(data)


def _garbage_chunk(bundle: bytes) -> bytes:
    _, chunks = parse_bundle(bundle)
    chunks[1] = b"\x08\x80\x20" + bytes(range(256)) * 4  # hash updated to match: only parsing can catch it
    return _rewrite(bundle, chunks=chunks)


def _wrong_scale_chunk(public_key: CkksKey, bundle: bytes) -> bytes:
    _, chunks = parse_bundle(bundle)
    chunks[0] = ts.ckks_vector(public_key.context, [0.0] * 4096, scale=2.0**30).serialize()
    return _rewrite(bundle, chunks=chunks)


def _drop_last_chunk(bundle: bytes) -> bytes:
    _, chunks = parse_bundle(bundle)
    return _rewrite(bundle, chunks=chunks[:-1])


# Each case: (reason, how the bad bank's bundle is made from (ctx, updates, weights, good bundles)).
BadMaker = Callable[..., list[tuple[str, bytes]]]


def _reencrypt(key: CkksKey, update: np.ndarray, weight: float, **kw) -> bytes:
    args = {"round": ROUND, "layout_hash": LAYOUT, "bank_id": "bank4"} | kw
    return encrypt_update(update, weight=weight, key=key, **args)


CASES: dict[str, tuple[str, Callable]] = {
    "other job's key": ("key_id", lambda k, o, u, w, b: _reencrypt(o, u[4], w[4])),
    "old key epoch": (
        "epoch",
        lambda k, o, u, w, b: _reencrypt(dataclasses.replace(k, info=dataclasses.replace(k.info, epoch=2)), u[4], w[4]),
    ),
    "stale round": ("round", lambda k, o, u, w, b: _reencrypt(k, u[4], w[4], round=ROUND - 1)),
    "other layout hash": ("layout", lambda k, o, u, w, b: _reencrypt(k, u[4], w[4], layout_hash="f" * 64)),
    "other element count": ("layout", lambda k, o, u, w, b: _reencrypt(k, u[4][:-1], w[4])),
    "missing chunk": ("chunk_count", lambda k, o, u, w, b: _drop_last_chunk(b["bank4"])),
    "chunk list shorter than header": ("chunk_count", lambda k, o, u, w, b: _header_claims_more_chunks(b["bank4"])),
    "flipped byte (hash mismatch)": ("hash", lambda k, o, u, w, b: _flip_byte(b["bank4"])),
    "undeserializable chunk": ("deserialize", lambda k, o, u, w, b: _garbage_chunk(b["bank4"])),
    "truncated bundle": ("deserialize", lambda k, o, u, w, b: b["bank4"][:-10]),
    "not a bundle": ("deserialize", lambda k, o, u, w, b: b"\x00" * 64),
    "wrong ciphertext scale": ("ciphertext", lambda k, o, u, w, b: _wrong_scale_chunk(k, b["bank4"])),
    "header names another bank": ("bank_id", lambda k, o, u, w, b: _reencrypt(k, u[4], w[4], bank_id="bank9")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_contribution_is_rejected_and_the_rest_aggregates(
    case: str, round_data, server_key, secret_key, public_key, other_key_files
) -> None:
    reason, make_bad = CASES[case]
    updates, weights, bundles = round_data
    other = load_public_context(other_key_files.public_path)
    bad = make_bad(public_key, other, updates, weights, bundles)
    # The bad bank comes first, so a faulty check would also have to leave the accumulator alone.
    items = [("bank4", bad)] + [(f"bank{i}", bundles[f"bank{i}"]) for i in range(K - 1)]
    expected = expected_for(server_key, N)
    result = aggregate(items, key=server_key, expected=expected)

    assert [(r.bank_id, r.reason) for r in result.rejected] == [("bank4", reason)]
    assert "bank4" in result.rejected[0].message
    assert result.accepted == [f"bank{i}" for i in range(K - 1)]
    mean, total = decrypt_mean(result.bundle, secret_key, expected=expected)
    assert np.abs(mean - plain_weighted_mean(updates[:-1], weights[:-1])).max() < 1e-6
    assert abs(total - sum(weights[:-1])) < 1e-6


def test_duplicate_bank_is_rejected(round_data, server_key, secret_key, public_key) -> None:
    updates, weights, bundles = round_data
    resent = encrypt_update(
        updates[1], weight=weights[1], key=public_key, round=ROUND, layout_hash=LAYOUT, bank_id="bank1"
    )
    items = list(bundles.items()) + [("bank1", resent)]
    result = aggregate(items, key=server_key, expected=expected_for(server_key, N))
    assert [(r.bank_id, r.reason) for r in result.rejected] == [("bank1", "duplicate")]
    assert "already accepted" in result.rejected[0].message
    assert result.accepted == [f"bank{i}" for i in range(K)]
    mean, _ = decrypt_mean(result.bundle, secret_key)
    assert np.abs(mean - plain_weighted_mean(updates, weights)).max() < 1e-6


def test_replayed_ciphertext_is_rejected(round_data, server_key) -> None:
    _, _, bundles = round_data
    # bank5 copies bank0's ciphertexts under its own name: it would double bank0's weight.
    replay = _rewrite(bundles["bank0"], bank_id="bank5", contributors=("bank5",))
    items = list(bundles.items()) + [("bank5", replay)]
    result = aggregate(items, key=server_key, expected=expected_for(server_key, N))
    assert [(r.bank_id, r.reason) for r in result.rejected] == [("bank5", "duplicate")]
    assert "bank0" in result.rejected[0].message


def test_sum_sent_back_is_rejected(round_data, server_key) -> None:
    _, _, bundles = round_data
    expected = expected_for(server_key, N)
    total = aggregate(bundles, key=server_key, expected=expected).bundle
    result = aggregate({"bank0": total}, key=server_key, expected=expected)
    assert result.bundle is None and [r.reason for r in result.rejected] == ["kind"]


def test_nothing_valid_gives_no_bundle(round_data, server_key) -> None:
    _, _, bundles = round_data
    result = aggregate(bundles, key=server_key, expected=expected_for(server_key, N, round=ROUND + 1))
    assert result.bundle is None and result.accepted == []
    assert {r.reason for r in result.rejected} == {"round"} and len(result.rejected) == K
    assert aggregate({}, key=server_key, expected=expected_for(server_key, N)).bundle is None


def test_server_refuses_secret_context_and_wrong_key(round_data, key_files, server_key, other_key_files) -> None:
    _, _, bundles = round_data
    secret = load_secret_context(key_files.secret_path)
    with pytest.raises(CryptoError, match="secret key"):
        aggregate(bundles, key=secret, expected=expected_for(secret, N))
    other = load_public_context(other_key_files.public_path)
    with pytest.raises(CryptoError, match="expected key"):
        aggregate(bundles, key=other, expected=expected_for(server_key, N))


def test_sum_decrypts_to_weighted_sum_slots(round_data, server_key, secret_key) -> None:
    updates, weights, bundles = round_data
    result = aggregate(bundles, key=server_key, expected=expected_for(server_key, N))
    header, values = decrypt_bundle(result.bundle, secret_key)
    assert isinstance(header, BundleHeader) and values.shape == (N + 1,)
    want = sum(w * u.astype(np.float64) for u, w in zip(updates, weights, strict=True))
    assert np.abs(values[:N] - want).max() < 1e-6
