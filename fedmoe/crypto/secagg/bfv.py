"""BFV for secure aggregation, public side: key files, public-key encryption, bundles, adding.

Nothing here can decrypt: the server imports this module and `fedmoe.crypto.secagg.server` only. Key
generation, the secret loader and decryption live in `fedmoe.crypto.secagg.bfv_secret` (banks only).

Key files (fedmoe/crypto/envelope.py frame, magic b"FMBFVKY1", JSON header {format, kind, key_id, params}):
  context.secret.bfv  banks: secret key + public key + parameters (mode 0600)
  context.public.bfv  server: parameters + public key only (no secret, relinearization or Galois keys)

Bundle (magic b"FMBFVSB1"): a vector of residues modulo t, N per ciphertext chunk; the header
carries kind ("masked_input" or "sum"), key id, job id, round, bank id, value count, slots per
chunk and each chunk's byte size and SHA-256.
"""

from __future__ import annotations

import hashlib
import logging
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tenseal as ts

from fedmoe.crypto.envelope import chunk_index, open_envelope, pack_envelope, split_payload
from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.secagg.params import SecAggParams, centered

log = logging.getLogger(__name__)

SECRET_FILE = "context.secret.bfv"
PUBLIC_FILE = "context.public.bfv"
INFO_FILE = "bfv-key.json"
KEY_MAGIC = b"FMBFVKY1"
BUNDLE_MAGIC = b"FMBFVSB1"
FORMAT = 1
BfvKeyKind = Literal["secret", "public"]
BundleKind = Literal["masked_input", "sum"]


@dataclass(frozen=True, eq=False)
class BfvKey:
    """A loaded BFV context and what identifies it. `context` can decrypt only if loaded as secret."""

    context: ts.Context = field(repr=False)
    key_id: str
    params: SecAggParams
    path: Path | None = None

    def is_private(self) -> bool:
        return self.context.is_private()


def bfv_key_id(ctx: ts.Context) -> str:
    """Fingerprint of the public parts (parameters + public key): 32 hex chars of SHA-256."""
    public = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    return hashlib.sha256(public).hexdigest()[:32]


def public_payload(ctx: ts.Context) -> bytes:
    """The context without secret, relinearization or Galois keys (~0.2 MB at the defaults)."""
    return ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)


def key_envelope(kind: BfvKeyKind, key_id: str, params: SecAggParams, payload: bytes) -> bytes:
    header = {
        "format": FORMAT,
        "kind": kind,
        "key_id": key_id,
        "params": params.to_dict(),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    return pack_envelope(KEY_MAGIC, header, payload)


def load_key_bytes(data: bytes, kind: BfvKeyKind, *, what: str) -> BfvKey:
    """Parse and check a key envelope (file bytes or a ceremony delivery) of the given kind."""
    header, payload = open_envelope(data, KEY_MAGIC, what=what)
    if header.get("format") != FORMAT or header.get("kind") != kind:
        hint = " (the server must hold only the public file)" if kind == "public" else ""
        raise CryptoError(
            f"{what}: expected a {kind} BFV key (format {FORMAT}), got kind {header.get('kind')!r} "
            f"format {header.get('format')!r}{hint}"
        )
    payload = bytes(payload)
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise CryptoError(f"{what}: payload SHA-256 does not match the header: corrupted")
    params = SecAggParams.from_dict(header.get("params"))
    try:
        ctx = ts.context_from(payload)
    except Exception as e:  # TenSEAL raises ValueError/RuntimeError on bad data
        raise CryptoError(f"{what}: TenSEAL cannot load the context: {e}") from e
    if ctx.is_private() != (kind == "secret"):
        raise CryptoError(f"{what}: header says {kind}, the context is {'private' if ctx.is_private() else 'public'}")
    got = bfv_key_id(ctx)
    if got != header.get("key_id"):
        raise CryptoError(f"{what}: key id expected {header.get('key_id')} (header), got {got} (recomputed)")
    return BfvKey(context=ctx, key_id=got, params=params)


def load_bfv_public(path: str | Path) -> BfvKey:
    """Load the server's public BFV context (encrypts and adds; cannot decrypt).

    Raises:
        CryptoError: missing or malformed file, or a secret file given.
    """
    path = Path(path)
    if not path.is_file():
        raise CryptoError(f"public BFV context file {path}: not found")
    key = load_key_bytes(path.read_bytes(), "public", what=str(path))
    return BfvKey(context=key.context, key_id=key.key_id, params=key.params, path=path)


def check_secret_file_mode(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CryptoError(f"secret BFV context file {path}: mode {mode:04o} lets group/others access it, expected 0600")


# ------------------------------------------------------------------------------------------------
# bundles


@dataclass(frozen=True)
class BfvBundleHeader:
    kind: BundleKind
    key_id: str
    job_id: str
    round: int
    bank_id: str | None
    n_values: int
    slots: int
    chunk_sizes: tuple[int, ...]
    chunk_sha256: tuple[str, ...]

    @property
    def n_chunks(self) -> int:
        return -(-self.n_values // self.slots)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "key_id": self.key_id,
            "job_id": self.job_id,
            "round": self.round,
            "bank_id": self.bank_id,
            "n_values": self.n_values,
            "slots": self.slots,
            "chunk_sizes": list(self.chunk_sizes),
            "chunk_sha256": list(self.chunk_sha256),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BfvBundleHeader:
        try:
            h = cls(
                kind=d["kind"],
                key_id=str(d["key_id"]),
                job_id=str(d["job_id"]),
                round=int(d["round"]),
                bank_id=None if d["bank_id"] is None else str(d["bank_id"]),
                n_values=int(d["n_values"]),
                slots=int(d["slots"]),
                chunk_sizes=tuple(int(x) for x in d["chunk_sizes"]),
                chunk_sha256=tuple(str(x) for x in d["chunk_sha256"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CryptoError(f"BFV bundle header: missing or bad field: {e}", reason="deserialize") from e
        if d.get("format") != FORMAT or h.kind not in ("masked_input", "sum") or h.n_values < 1 or h.slots < 1:
            raise CryptoError(f"BFV bundle header: bad format/kind/sizes in {d!r:.200}", reason="deserialize")
        if not h.n_chunks == len(h.chunk_sizes) == len(h.chunk_sha256):
            raise CryptoError(
                f"BFV bundle header: {h.n_values} values at {h.slots} slots need {h.n_chunks} chunks, "
                f"header lists {len(h.chunk_sizes)} sizes and {len(h.chunk_sha256)} hashes",
                reason="chunk_count",
            )
        return h


def encrypt_residues(
    residues: np.ndarray, key: BfvKey, *, kind: BundleKind, job_id: str, round: int, bank_id: str | None
) -> bytes:
    """Encrypt residues modulo t (uint64, length n) under the public key into a bundle."""
    params = key.params
    values = centered(residues, params.plain_modulus)  # TenSEAL's encoder takes signed int64
    slots = params.slots
    chunks = [
        ts.bfv_vector(key.context, values[i : i + slots].tolist()).serialize() for i in range(0, values.size, slots)
    ]
    return pack_bfv_bundle(
        BfvBundleHeader(
            kind=kind,
            key_id=key.key_id,
            job_id=job_id,
            round=round,
            bank_id=bank_id,
            n_values=int(values.size),
            slots=slots,
            **chunk_index(chunks),
        ),
        chunks,
    )


def pack_bfv_bundle(header: BfvBundleHeader, chunks: list[bytes]) -> bytes:
    assert len(chunks) == header.n_chunks, "header/chunks out of sync"
    return pack_envelope(BUNDLE_MAGIC, header.to_dict(), chunks)


def parse_bfv_bundle(data: bytes) -> tuple[BfvBundleHeader, list[bytes]]:
    """Split a bundle into its header and chunk bytes (sizes checked; hashes in `load_bfv_chunks`).

    Raises:
        CryptoError: reason "deserialize" or "chunk_count".
    """
    raw, payload = open_envelope(data, BUNDLE_MAGIC, what="BFV bundle", reason="deserialize")
    header = BfvBundleHeader.from_dict(raw)
    return header, split_payload(payload, header.chunk_sizes, what="BFV bundle", reason="deserialize")


def load_bfv_chunks(key: BfvKey, header: BfvBundleHeader, chunks: list[bytes]) -> list[ts.BFVVector]:
    """Hash-check, deserialize and metadata-check every chunk before any is used.

    Raises:
        CryptoError: reason "key_id", "chunk_count", "hash", "deserialize" or "ciphertext".
    """
    if header.key_id != key.key_id:
        raise CryptoError(f"BFV bundle: key id expected {key.key_id}, got {header.key_id}", reason="key_id")
    if header.slots != key.params.slots:
        raise CryptoError(f"BFV bundle: slots expected {key.params.slots}, got {header.slots}", reason="chunk_count")
    ref = ts.bfv_vector(key.context, [0]).ciphertext()[0]
    vecs = []
    for i, chunk in enumerate(chunks):
        digest = hashlib.sha256(chunk).hexdigest()
        if digest != header.chunk_sha256[i]:
            raise CryptoError(f"BFV chunk {i}: SHA-256 differs from the header", reason="hash")
        try:
            vec = ts.bfv_vector_from(key.context, chunk)
            ct = vec.ciphertext()[0]
        except Exception as e:  # TenSEAL/SEAL raise ValueError or RuntimeError on bad data
            raise CryptoError(f"BFV chunk {i}: cannot deserialize: {e}", reason="deserialize") from e
        want = min(header.slots, header.n_values - i * header.slots)
        if vec.size() != want or ct.size() != 2 or tuple(ct.parms_id()) != tuple(ref.parms_id()):
            raise CryptoError(
                f"BFV chunk {i}: expected {want} values in a fresh 2-poly ciphertext, got {vec.size()} values, "
                f"{ct.size()} polys",
                reason="ciphertext",
            )
        vecs.append(vec)
    return vecs


def serialize_sum(
    vecs: list[ts.BFVVector], key: BfvKey, *, job_id: str, round: int, n_values: int, kind: BundleKind = "sum"
) -> bytes:
    chunks = [v.serialize() for v in vecs]
    header = BfvBundleHeader(
        kind=kind,
        key_id=key.key_id,
        job_id=job_id,
        round=round,
        bank_id=None,
        n_values=n_values,
        slots=key.params.slots,
        chunk_sizes=tuple(len(c) for c in chunks),
        chunk_sha256=tuple(hashlib.sha256(c).hexdigest() for c in chunks),
    )
    return pack_bfv_bundle(header, chunks)
