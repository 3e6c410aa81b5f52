"""Packing: a flat float32 update <-> a bundle of CKKS ciphertext chunks with a JSON header.

A bank encrypts the vector v = [w * delta_0, ..., w * delta_{n-1}, w] (length n + 1): the update
pre-scaled by its sample weight w, with w itself in the slot after the last element. The server adds
bundles slot-wise, so the sum bundle holds [sum_k w_k delta_k..., sum_k w_k] and a bank recovers the
weighted mean by one division (`decrypt_mean`). The server never sees w or delta.

Bundle layout (bytes; the framing is fedmoe/crypto/envelope.py's, shared with the key files):
  8-byte magic b"FMCKKSB1" | u32 big-endian header length | header JSON (UTF-8) | chunk 0 | chunk 1 | ...
Chunk i is the TenSEAL serialization of one CKKSVector holding v[i*S:(i+1)*S], S = N/2 slots.
The header carries the key id, epoch, round, element count, chunk count, slots per chunk, the layout
hash of tensor names+shapes (computed by the model side; carried and compared here), each chunk's
byte size and SHA-256, and who contributed. The hashes catch corruption, not forgery: anyone can
recompute them, so authenticity comes from the transport (Flower TLS + node authentication).

Precision (N=8192, [60, 40, 60], scale 2^40): CKKS adds an absolute error of ~1e-9..3e-8 per value
of the encrypted sum whatever the values' size, plus a relative ~1.5e-14. The mean's error is thus
~(that noise) / total_weight: larger weights are *more* precise. Measured, K=5, 4000 elements,
|delta| ~ 1e-2, max abs error of the decrypted mean before its float32 cast:
  w ~ 1e-3: 6.0e-7   w ~ 1: 6.8e-10   w ~ 1e3: 5.4e-13   w ~ 1e5: 8.2e-15
Use raw sample counts as weights; normalising w to small fractions costs precision (w ~ 1e-3
brings the error close to 1e-6). The upper bound is CkksParams.max_abs_value (2^48) on |w * delta|.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import tenseal as ts

from fedmoe.crypto.envelope import canonical_json, chunk_index, open_envelope, pack_envelope, split_payload
from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.keys import CkksKey

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
_BUNDLE_MAGIC = b"FMCKKSB1"

BundleKind = Literal["update", "sum"]


@dataclass(frozen=True)
class BundleHeader:
    """The plaintext part of a bundle (JSON); describes, never contains, the encrypted values.

    Attributes:
        kind: "update" (one bank) or "sum" (the server's aggregate).
        key_id, epoch: the key the chunks are encrypted under.
        round: federation round the update belongs to.
        n_elements: real elements; one more slot after them holds the (summed) weight.
        n_chunks: ceil((n_elements + 1) / slots_per_chunk).
        slots_per_chunk: N/2 of the key's parameters.
        layout_hash: model-side hash of the trainable view's tensor names and shapes.
        bank_id: the sending bank for "update"; None for "sum".
        contributors: banks whose updates are inside, in aggregation order.
        chunk_sizes, chunk_sha256: byte length and SHA-256 (hex) of each serialized chunk.
    """

    kind: BundleKind
    key_id: str
    epoch: int
    round: int
    n_elements: int
    n_chunks: int
    slots_per_chunk: int
    layout_hash: str
    bank_id: str | None
    contributors: tuple[str, ...]
    chunk_sizes: tuple[int, ...]
    chunk_sha256: tuple[str, ...]
    format: int = BUNDLE_FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("contributors", "chunk_sizes", "chunk_sha256"):
            d[k] = list(d[k])
        return d

    def to_json(self) -> str:
        return canonical_json(self.to_dict()).decode()

    @classmethod
    def from_dict(cls, d: Any) -> BundleHeader:
        """Strict parse: every field present with its type, else CryptoError(reason="deserialize")."""
        if not isinstance(d, dict):
            raise CryptoError(f"bundle header: expected a JSON object, got {type(d).__name__}", reason="deserialize")
        if d.get("format") != BUNDLE_FORMAT:
            raise CryptoError(
                f"bundle header: format expected {BUNDLE_FORMAT}, got {d.get('format')!r}", reason="deserialize"
            )
        ints = ("epoch", "round", "n_elements", "n_chunks", "slots_per_chunk")
        strs = ("key_id", "layout_hash")
        for k in ints:
            if not _is_int(d.get(k)):
                raise CryptoError(f"bundle header: field {k!r} expected an int, got {d.get(k)!r}", reason="deserialize")
        for k in strs:
            if not isinstance(d.get(k), str):
                raise CryptoError(
                    f"bundle header: field {k!r} expected a string, got {d.get(k)!r}", reason="deserialize"
                )
        if d.get("kind") not in ("update", "sum"):
            raise CryptoError(
                f"bundle header: kind expected 'update' or 'sum', got {d.get('kind')!r}", reason="deserialize"
            )
        if d.get("bank_id") is not None and not isinstance(d.get("bank_id"), str):
            raise CryptoError(
                f"bundle header: bank_id expected a string or null, got {d.get('bank_id')!r}", reason="deserialize"
            )
        lists = {"contributors": str, "chunk_sizes": int, "chunk_sha256": str}
        for k, typ in lists.items():
            v = d.get(k)
            if not isinstance(v, list) or not all(_is_int(x) if typ is int else isinstance(x, str) for x in v):
                raise CryptoError(
                    f"bundle header: field {k!r} expected a list of {typ.__name__}, got {v!r:.80}", reason="deserialize"
                )
        return cls(
            kind=d["kind"],
            key_id=d["key_id"],
            epoch=d["epoch"],
            round=d["round"],
            n_elements=d["n_elements"],
            n_chunks=d["n_chunks"],
            slots_per_chunk=d["slots_per_chunk"],
            layout_hash=d["layout_hash"],
            bank_id=d["bank_id"],
            contributors=tuple(d["contributors"]),
            chunk_sizes=tuple(d["chunk_sizes"]),
            chunk_sha256=tuple(d["chunk_sha256"]),
        )


@dataclass(frozen=True)
class ExpectedHeader:
    """What the receiver expects of every bundle in a round; anything else is rejected by name."""

    key_id: str
    epoch: int
    round: int
    layout_hash: str
    n_elements: int


def n_chunks_for(n_elements: int, slots: int) -> int:
    """Chunks needed for n_elements values plus the weight slot."""
    return math.ceil((n_elements + 1) / slots)


def encrypt_update(
    update: np.ndarray,
    *,
    weight: float,
    key: CkksKey,
    round: int,
    layout_hash: str,
    bank_id: str,
) -> bytes:
    """Encrypt one bank's update, pre-scaled by its weight, into a bundle.

    Encryption uses the key's public key (both the secret and the public context can do it): 1.5-1.9x
    slower than TenSEAL's symmetric mode but the path that survives a move to threshold keys, where
    no bank holds the whole secret (see bench/he.py and the README).

    Args:
        update: flat float32 vector (the model side's trainable-view delta), length n >= 1.
        weight: the bank's sample weight w > 0 (e.g. its sample count); the bundle holds w * update
            and w. Raw counts are fine and more precise than small normalised fractions.
        key: a context from `load_secret_context` or `load_public_context`.
        round: federation round (>= 0).
        layout_hash: model-side hash of tensor names and shapes.
        bank_id: this bank's id, as the server knows it.

    Returns:
        The bundle bytes (~57.6 bytes per element at the default parameters).

    Raises:
        CryptoError: update not a non-empty 1-D finite float32 array, bad weight, |w * update|
            beyond the parameters' headroom, or empty ids.
    """
    if not isinstance(update, np.ndarray) or update.dtype != np.float32 or update.ndim != 1 or update.size == 0:
        got = (
            f"{update.dtype} array of shape {update.shape}" if isinstance(update, np.ndarray) else type(update).__name__
        )
        raise CryptoError(f"encrypt_update(bank {bank_id!r}): update expected a non-empty 1-D float32 array, got {got}")
    if not np.isfinite(update).all():
        bad = int(np.flatnonzero(~np.isfinite(update))[0])
        raise CryptoError(f"encrypt_update(bank {bank_id!r}): update[{bad}] = {update[bad]} is not finite")
    limit = key.params.max_abs_value
    w = float(weight)
    if not (math.isfinite(w) and 0.0 < w <= limit):
        raise CryptoError(
            f"encrypt_update(bank {bank_id!r}): weight expected a finite number in (0, {limit:.3g}], got {weight!r}"
        )
    for name, value in (("bank_id", bank_id), ("layout_hash", layout_hash)):
        if not isinstance(value, str) or not value:
            raise CryptoError(f"encrypt_update: {name} expected a non-empty string, got {value!r}")
    if not _is_int(round) or round < 0:
        raise CryptoError(f"encrypt_update(bank {bank_id!r}): round expected an int >= 0, got {round!r}")

    n = int(update.size)
    values = np.empty(n + 1, dtype=np.float64)  # (n + 1,): [w * delta..., w]
    np.multiply(update, w, out=values[:n], dtype=np.float64)  # float64: a float32 product loses 1e-7 relative
    values[n] = w
    peak = float(np.abs(values[:n]).max())
    if peak > limit:
        raise CryptoError(
            f"encrypt_update(bank {bank_id!r}): max |weight * update| = {peak:.3g} exceeds {limit:.3g}, "
            f"the CKKS headroom of scale 2^{key.params.scale_bits}; lower the weight"
        )

    slots = key.params.slots
    n_chunks = n_chunks_for(n, slots)
    chunks = []
    for i in range(n_chunks):
        # tolist() is what TenSEAL's encoder takes fastest (measured vs plain_tensor).
        vec = ts.ckks_vector(key.context, values[i * slots : (i + 1) * slots].tolist())
        chunks.append(vec.serialize())
    header = BundleHeader(
        kind="update",
        key_id=key.key_id,
        epoch=key.epoch,
        round=round,
        n_elements=n,
        n_chunks=len(chunks),
        slots_per_chunk=slots,
        layout_hash=layout_hash,
        bank_id=bank_id,
        contributors=(bank_id,),
        **chunk_index(chunks),
    )
    log.debug("encrypted update of bank %s round %d: %d elements in %d chunks", bank_id, round, n, n_chunks)
    return pack_bundle(header, chunks)


def pack_bundle(header: BundleHeader, chunks: list[bytes]) -> bytes:
    """Serialize a header and its chunk bytes (which must match the header's sizes and hashes)."""
    assert len(chunks) == header.n_chunks == len(header.chunk_sizes), "header/chunks out of sync"
    return pack_envelope(_BUNDLE_MAGIC, header.to_dict(), chunks)


def parse_bundle(data: bytes) -> tuple[BundleHeader, list[bytes]]:
    """Split bundle bytes into the header and the per-chunk ciphertext bytes.

    Checks the structure (magic, header fields, chunk count vs element count, total size); chunk
    hashes are checked by `load_chunk`, right before each chunk is used.

    Args:
        data: bundle bytes from `encrypt_update` or the aggregator.

    Returns:
        (header, chunk bytes in order).

    Raises:
        CryptoError: reason "deserialize" for a malformed container, "chunk_count" when the chunk
            count disagrees with the element count or the chunk lists.
    """
    raw, payload = open_envelope(data, _BUNDLE_MAGIC, what="bundle", reason="deserialize")
    header = BundleHeader.from_dict(raw)
    if header.n_elements < 1 or header.slots_per_chunk < 1:
        raise CryptoError(
            f"bundle: n_elements {header.n_elements} and slots_per_chunk {header.slots_per_chunk} must be >= 1",
            reason="deserialize",
        )
    want = n_chunks_for(header.n_elements, header.slots_per_chunk)
    if not header.n_chunks == want == len(header.chunk_sizes) == len(header.chunk_sha256):
        raise CryptoError(
            f"bundle: chunk count expected {want} for {header.n_elements} elements + weight at "
            f"{header.slots_per_chunk} slots/chunk, got n_chunks {header.n_chunks}, "
            f"{len(header.chunk_sizes)} sizes, {len(header.chunk_sha256)} hashes",
            reason="chunk_count",
        )
    return header, split_payload(payload, header.chunk_sizes, what="bundle", reason="deserialize")


def check_header(header: BundleHeader, expected: ExpectedHeader, *, slots: int) -> None:
    """Compare a header with what this round expects.

    Raises:
        CryptoError: reason "key_id", "epoch", "round", "layout" or "chunk_count", naming expected vs got.
    """
    if header.key_id != expected.key_id:
        raise CryptoError(f"key id expected {expected.key_id}, got {header.key_id}", reason="key_id")
    if header.epoch != expected.epoch:
        raise CryptoError(f"key epoch expected {expected.epoch}, got {header.epoch}", reason="epoch")
    if header.round != expected.round:
        raise CryptoError(f"round expected {expected.round}, got {header.round}", reason="round")
    if header.layout_hash != expected.layout_hash:
        raise CryptoError(
            f"layout hash expected {expected.layout_hash[:16]}..., got {header.layout_hash[:16]}...", reason="layout"
        )
    if header.n_elements != expected.n_elements:
        raise CryptoError(f"element count expected {expected.n_elements}, got {header.n_elements}", reason="layout")
    if header.slots_per_chunk != slots or header.n_chunks != n_chunks_for(expected.n_elements, slots):
        raise CryptoError(
            f"chunks expected {n_chunks_for(expected.n_elements, slots)} of {slots} slots, "
            f"got {header.n_chunks} of {header.slots_per_chunk}",
            reason="chunk_count",
        )


@dataclass(frozen=True)
class CiphertextRef:
    """CKKS metadata every fresh ciphertext under a key has; taken from one encryption of zero."""

    parms_id: tuple[int, ...]
    scale: float
    poly_modulus_degree: int

    @classmethod
    def of(cls, ctx: ts.Context) -> CiphertextRef:
        ct = ts.ckks_vector(ctx, [0.0]).ciphertext()[0]
        return cls(parms_id=tuple(ct.parms_id()), scale=ct.scale, poly_modulus_degree=ct.poly_modulus_degree())


def load_chunk(ctx: ts.Context, header: BundleHeader, index: int, chunk: bytes, ref: CiphertextRef) -> ts.CKKSVector:
    """Verify one chunk's hash, deserialize it and check its CKKS metadata before anyone uses it.

    A bundle can parse yet carry a ciphertext at another level or scale; TenSEAL would silently
    mod-switch the whole sum to match it (or fail mid-aggregation), so those are rejected here.

    Args:
        ctx: context the ciphertext is loaded under (public suffices).
        header: the bundle's parsed header.
        index: chunk index.
        chunk: the chunk's bytes.
        ref: `CiphertextRef.of(ctx)`, computed once per bundle set.

    Returns:
        The deserialized vector.

    Raises:
        CryptoError: reason "hash", "deserialize" or "ciphertext".
    """
    digest = hashlib.sha256(chunk).hexdigest()
    if digest != header.chunk_sha256[index]:
        raise CryptoError(
            f"chunk {index}: SHA-256 expected {header.chunk_sha256[index][:16]}..., got {digest[:16]}...", reason="hash"
        )
    try:
        vec = ts.ckks_vector_from(ctx, chunk)
        ct = vec.ciphertext()[0]
    except Exception as e:  # TenSEAL/SEAL raise ValueError or RuntimeError on bad protobuf or data
        raise CryptoError(f"chunk {index}: cannot deserialize a CKKS vector: {e}", reason="deserialize") from e
    slots = header.slots_per_chunk
    want_size = min(slots, header.n_elements + 1 - index * slots)
    problems = []
    if vec.size() != want_size:
        problems.append(f"size expected {want_size}, got {vec.size()}")
    if tuple(ct.parms_id()) != ref.parms_id:
        problems.append("modulus level differs from a fresh ciphertext")
    if ct.scale != ref.scale:
        problems.append(f"scale expected {ref.scale:.6g}, got {ct.scale:.6g}")
    if ct.size() != 2 or ct.poly_modulus_degree() != ref.poly_modulus_degree or not ct.is_ntt_form():
        problems.append(
            f"ciphertext shape expected 2 polys of degree {ref.poly_modulus_degree} in NTT form, "
            f"got {ct.size()} of {ct.poly_modulus_degree()}"
        )
    if problems:
        raise CryptoError(f"chunk {index}: " + "; ".join(problems), reason="ciphertext")
    return vec


def decrypt_bundle(
    bundle: bytes, key: CkksKey, *, expected: ExpectedHeader | None = None
) -> tuple[BundleHeader, np.ndarray]:
    """Decrypt a bundle (one bank's update or the server's sum) to its raw slot values.

    Args:
        bundle: bundle bytes.
        key: the banks' secret context (`load_secret_context`).
        expected: if given, the header must match it (round, layout, ...).

    Returns:
        (header, values): float64 array of n_elements + 1 values, [sum of w*delta..., sum of w].

    Raises:
        CryptoError: public context given, key id/epoch mismatch, any header/chunk problem
            (the error's `reason` says which).
    """
    if not key.is_private():
        raise CryptoError(f"decrypt: context from {key.path} is public; decryption needs the banks' secret context")
    header, chunks = parse_bundle(bundle)
    if header.key_id != key.key_id:
        raise CryptoError(
            f"decrypt: key id expected {key.key_id} (from {key.path}), got {header.key_id}", reason="key_id"
        )
    if header.epoch != key.epoch:
        raise CryptoError(f"decrypt: key epoch expected {key.epoch}, got {header.epoch}", reason="epoch")
    if expected is not None:
        check_header(header, expected, slots=key.params.slots)
    elif header.slots_per_chunk != key.params.slots:
        raise CryptoError(
            f"decrypt: slots per chunk expected {key.params.slots}, got {header.slots_per_chunk}", reason="chunk_count"
        )
    ref = CiphertextRef.of(key.context)
    values = np.empty(header.n_elements + 1, dtype=np.float64)
    slots = header.slots_per_chunk
    for i, chunk in enumerate(chunks):
        vec = load_chunk(key.context, header, i, chunk, ref)
        values[i * slots : i * slots + vec.size()] = vec.decrypt()
    return header, values


def decrypt_mean(bundle: bytes, key: CkksKey, *, expected: ExpectedHeader | None = None) -> tuple[np.ndarray, float]:
    """Decrypt a sum bundle and divide by its total weight: the weighted mean of the banks' updates.

    Args:
        bundle: the server's sum bundle (a single bank's update also works: its mean is the update).
        key: the banks' secret context.
        expected: optional header expectations, as in `decrypt_bundle`.

    Returns:
        (mean, total_weight): float32 vector of n_elements values (the model side's flat layout),
        and the decrypted sum of the weights.

    Raises:
        CryptoError: as `decrypt_bundle`, or a non-positive decrypted total weight.
    """
    header, values = decrypt_bundle(bundle, key, expected=expected)
    total = float(values[header.n_elements])
    # CKKS decryption is approximate but never flips the sign of a sum of positive weights; a
    # non-positive total means a wrong key or a forged bundle, not rounding.
    if not (math.isfinite(total) and total > 0):
        raise CryptoError(f"decrypt_mean: decrypted total weight is {total}, expected > 0 (wrong key or forged bundle)")
    mean = (values[: header.n_elements] / total).astype(np.float32)
    return mean, total


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
