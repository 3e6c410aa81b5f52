"""The one framing every crypto file and message uses: magic | u32 header length | JSON header | payload.

  8-byte magic (names the kind and version, e.g. b"FMCKKEY1") | u32 big-endian header length |
  header: canonical JSON (sorted keys, no spaces, UTF-8) | payload bytes (opaque here)

Key files (keys.py), CKKS bundles (packing.py) and BFV bundles (secagg) all go through these two
functions, so the parsing rules (length bound, JSON object, truncation) live in one place. So do
the chunk list of a bundle's header (`chunk_index`, `split_payload`) and the key ceremonies' output
folder (`key_folder`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from fedmoe.crypto.errors import CryptoError, RejectReason

MAGIC_BYTES = 8
# A header names <= one SHA-256 per ciphertext chunk; 64 MiB covers > 10^9 values and stops a
# length field from making us allocate gigabytes before the JSON is even parsed.
MAX_HEADER_BYTES = 64 << 20


def canonical_json(obj: Any) -> bytes:
    """The byte form that is hashed and signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def pack_envelope(magic: bytes, header: dict[str, Any], payload: bytes | list[bytes] = b"") -> bytes:
    """Frame a JSON header and its payload (bytes, or parts that are concatenated in order)."""
    assert len(magic) == MAGIC_BYTES, "magic must be 8 bytes"
    hbytes = canonical_json(header)
    parts = payload if isinstance(payload, list) else [payload]
    return b"".join([magic, struct.pack(">I", len(hbytes)), hbytes, *parts])


def open_envelope(
    data: bytes | bytearray | memoryview,
    magic: bytes,
    *,
    what: str,
    reason: RejectReason | None = None,
) -> tuple[dict[str, Any], memoryview]:
    """Split framed bytes into the JSON header (a dict) and a view of the payload.

    Args:
        data: the framed bytes.
        magic: the 8-byte magic the caller expects.
        what: names the thing in error messages (a file path, "bundle", ...).
        reason: reject-reason code carried by the CryptoError (e.g. "deserialize" for a bank's
            contribution), or None when a failure is not one bank's fault (a local key file).

    Returns:
        (header, payload view).

    Raises:
        CryptoError: not bytes, wrong magic, header length past the end or over MAX_HEADER_BYTES,
            header not a UTF-8 JSON object.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CryptoError(f"{what}: expected bytes, got {type(data).__name__}", reason=reason)
    view = memoryview(data)
    n = MAGIC_BYTES
    if len(view) < n + 4 or bytes(view[:n]) != magic:
        raise CryptoError(f"{what}: magic expected {magic!r}, got {bytes(view[:n])!r}", reason=reason)
    (hlen,) = struct.unpack(">I", view[n : n + 4])
    start = n + 4
    if hlen > MAX_HEADER_BYTES or start + hlen > len(view):
        raise CryptoError(f"{what}: header length {hlen} runs past the {len(view)}-byte input", reason=reason)
    try:
        header = json.loads(bytes(view[start : start + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CryptoError(f"{what}: header is not UTF-8 JSON: {e}", reason=reason) from e
    if not isinstance(header, dict):
        raise CryptoError(f"{what}: header expected a JSON object, got {type(header).__name__}", reason=reason)
    return header, view[start + hlen :]


class ChunkIndex(TypedDict):
    chunk_sizes: tuple[int, ...]
    chunk_sha256: tuple[str, ...]


def chunk_index(chunks: Sequence[bytes]) -> ChunkIndex:
    """The `chunk_sizes` and `chunk_sha256` (hex) fields a chunked bundle's header lists for `chunks`."""
    return {
        "chunk_sizes": tuple(len(c) for c in chunks),
        "chunk_sha256": tuple(hashlib.sha256(c).hexdigest() for c in chunks),
    }


def split_payload(payload: memoryview, sizes: Sequence[int], *, what: str, reason: RejectReason) -> list[bytes]:
    """Cut a payload into consecutive parts of the header's `sizes` (chunked bundles).

    Raises:
        CryptoError: a negative size, or sizes that do not add up to the payload's length.
    """
    if any(s < 0 for s in sizes) or sum(sizes) != len(payload):
        raise CryptoError(
            f"{what}: payload is {len(payload)} bytes, the header's chunk sizes add up to "
            f"{sum(sizes)}: truncated or padded",
            reason=reason,
        )
    parts, pos = [], 0
    for size in sizes:
        parts.append(bytes(payload[pos : pos + size]))
        pos += size
    return parts


def key_folder(
    out_dir: str | Path, names: Sequence[str], *, what: str, overwrite: bool
) -> tuple[Path, tuple[Path, ...]]:
    """Create a key ceremony's output folder (mode 0700) and name its files, refusing to clobber them.

    Returns:
        (the folder, the path of each of `names` in it).

    Raises:
        CryptoError: some of the files exist already and `overwrite` is false.
    """
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = tuple(out / name for name in names)
    present = [p.name for p in paths if p.exists()]
    if present and not overwrite:
        raise CryptoError(f"{what}: {out} already holds key files {present}; pass overwrite/--force to replace them")
    return out, paths
