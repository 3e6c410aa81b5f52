"""Key ceremony: one CKKS context per federation job, split into a banks' file and a server's file.

`keygen` writes, in one directory:
  context.secret.ckks  every bank mounts this: secret key + public key + parameters (mode 0600)
  context.public.ckks  the server mounts only this: parameters + public key, no secret, Galois or
                       relinearization keys (~0.36 MB at N=8192; mode 0600)
  key.json             key id, epoch and parameters; no key material (mode 0644)
The `.secret` infix matches the repo's `*.secret*` gitignore rule.

Each .ckks file is an envelope: 8-byte magic, u32 big-endian header length, a JSON header (kind,
key id, epoch, parameters, SHA-256 of the payload) and the TenSEAL-serialized context. The key id is a
fingerprint of the public parts only (parameters, scale, public key), so both files carry the same id
and every ciphertext header can name the key it was made with without revealing anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import tenseal as ts

from fedmoe.crypto.envelope import key_folder, open_envelope, pack_envelope
from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.ring import MAX_COEFF_BITS, ring_sizes
from fedmoe.protocol.files import atomic_write_bytes

log = logging.getLogger(__name__)

SECRET_FILE = "context.secret.ckks"
PUBLIC_FILE = "context.public.ckks"
INFO_FILE = "key.json"

# Below 2^30 the CKKS encoding error (measured: 6.7e-6 at 2^30, 2.2e-4 at 2^25, 7.9e-3 at 2^20 per
# value) is as large as a DP-noised LoRA update, so the aggregate would be noise.
MIN_SCALE_BITS = 30
# SEAL's 128-bit-security limits for the N CKKS accepts (N = 2048 leaves no room for a 2^30+ scale).
_MAX_COEFF_BITS = {n: bits for n, bits in MAX_COEFF_BITS.items() if n >= 4096}
# Bits kept between the scale and the data modulus: room for |values| and for the server's sums.
_HEADROOM_BITS = 20

_KEY_MAGIC = b"FMCKKEY1"
_KEY_FORMAT = 1
KeyKind = Literal["secret", "public"]


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters of a federation job; defaults measured on the dev machine (see bench/he.py).

    Attributes:
        poly_modulus_degree: N; a ciphertext holds N/2 values.
        coeff_mod_bit_sizes: bit sizes of the coefficient-modulus primes; the last is the special
            (key-switching) prime, the others hold data.
        scale_bits: log2 of the global CKKS scale; >= 30 (see MIN_SCALE_BITS).
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        n, bits = ring_sizes(self, _MAX_COEFF_BITS)
        if len(bits) < 2 or not all(isinstance(b, int) and 20 <= b <= 60 for b in bits):
            raise CryptoError(
                f"CkksParams.coeff_mod_bit_sizes: expected >= 2 ints in [20, 60] (data primes + special prime), "
                f"got {list(bits)}"
            )
        if sum(bits) > _MAX_COEFF_BITS[n]:
            raise CryptoError(
                f"CkksParams.coeff_mod_bit_sizes: {sum(bits)} bits in total exceeds the 128-bit-security limit "
                f"{_MAX_COEFF_BITS[n]} for poly_modulus_degree {n}"
            )
        if not isinstance(self.scale_bits, int) or not MIN_SCALE_BITS <= self.scale_bits <= 60:
            raise CryptoError(
                f"CkksParams.scale_bits: expected an int in [{MIN_SCALE_BITS}, 60] (smaller scales give "
                f"encoding errors as large as the updates), got {self.scale_bits!r}"
            )
        if self.scale_bits + _HEADROOM_BITS > self.data_bits:
            raise CryptoError(
                f"CkksParams: scale_bits {self.scale_bits} + {_HEADROOM_BITS} headroom bits exceeds the "
                f"{self.data_bits} data bits of coeff_mod_bit_sizes {list(bits)}"
            )

    @property
    def slots(self) -> int:
        """Values per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives in (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def max_abs_value(self) -> float:
        """Largest |value| a bank may encrypt.

        Measured at the defaults: decryption keeps a relative error of ~1.5e-14 up to 1e18 per value
        (sums of 10). This bound, 2^(data_bits - scale_bits - 12) = 2^48 at the defaults, leaves
        2^12 of that room for the server's sum over up to 4096 banks.
        """
        return float(2 ** (self.data_bits - self.scale_bits - 12))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CkksParams:
        try:
            return cls(
                poly_modulus_degree=d["poly_modulus_degree"],
                coeff_mod_bit_sizes=tuple(d["coeff_mod_bit_sizes"]),
                scale_bits=d["scale_bits"],
            )
        except (KeyError, TypeError) as e:
            raise CryptoError(f"CkksParams: malformed parameters {d!r}: {e}") from e


@dataclass(frozen=True)
class KeyInfo:
    """What identifies a job key, safe to log and to put in messages: no key material."""

    key_id: str
    epoch: int
    params: CkksParams

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "epoch": self.epoch, "params": self.params.to_dict()}


@dataclass(frozen=True)
class KeyFiles:
    """What `keygen` wrote."""

    info: KeyInfo
    secret_path: Path
    public_path: Path
    info_path: Path


@dataclass(frozen=True, eq=False)
class CkksKey:
    """A loaded context plus the id and epoch its file carries.

    `context` is private (can decrypt) only when loaded by `load_secret_context`.
    """

    context: ts.Context = field(repr=False)
    info: KeyInfo
    path: Path

    @property
    def key_id(self) -> str:
        return self.info.key_id

    @property
    def epoch(self) -> int:
        return self.info.epoch

    @property
    def params(self) -> CkksParams:
        return self.info.params

    def is_private(self) -> bool:
        return self.context.is_private()


def key_id(ctx: ts.Context) -> str:
    """Fingerprint of a context's public parts: parameters, scale and public key.

    The secret and the public context of one ceremony give the same id. It hashes TenSEAL's
    serialization, so it is stable for the pinned TenSEAL version; loaders recompute it and fail
    loudly (never silently) if that ever changes.

    Args:
        ctx: an asymmetric (public-key) TenSEAL context, private or public.

    Returns:
        32 hex characters (128 bits of SHA-256).

    Raises:
        CryptoError: the context has no public key (e.g. a symmetric-encryption context).
    """
    try:
        has_pk = ctx.has_public_key()
    except ValueError as e:  # TenSEAL raises for symmetric contexts
        raise CryptoError(f"key_id: context has no public key ({e})") from e
    if not has_pk:
        raise CryptoError("key_id: context has no public key")
    public_parts = ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return hashlib.sha256(public_parts).hexdigest()[:32]


def keygen(
    out_dir: str | Path, params: CkksParams | None = None, *, epoch: int = 1, overwrite: bool = False
) -> KeyFiles:
    """Run the key ceremony for one job: write the banks' secret file, the server's public file and key.json.

    Every file is written atomically (temp file, fsync, rename), so a crash never leaves a partial key.

    Args:
        out_dir: directory to write to; created with mode 0700 if missing.
        params: CKKS parameters; defaults to `CkksParams()` (N=8192, [60, 40, 60], scale 2^40).
        epoch: key epoch (>= 1); bump it when rotating keys so stale bundles are rejected by name.
        overwrite: replace existing key files instead of refusing.

    Returns:
        The key info and the three paths.

    Raises:
        CryptoError: bad params/epoch, key files already present (and not `overwrite`), or TenSEAL
            refused the parameters.
    """
    params = params or CkksParams()
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise CryptoError(f"keygen: epoch must be an int >= 1, got {epoch!r}")
    out, paths = key_folder(out_dir, (SECRET_FILE, PUBLIC_FILE, INFO_FILE), what="keygen", overwrite=overwrite)

    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
    except ValueError as e:
        raise CryptoError(f"keygen: TenSEAL refused {params.to_dict()}: {e}") from e
    ctx.global_scale = params.scale
    info = KeyInfo(key_id=key_id(ctx), epoch=epoch, params=params)

    # No Galois or relinearization keys in either file: the server only adds, nobody rotates or
    # multiplies ciphertexts, and dropping them keeps the public file at ~0.36 MB.
    secret_payload = ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    public_payload = ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    # Never ship a public file that could decrypt: check the bytes we are about to write.
    check = ts.context_from(public_payload)
    if check.is_private() or key_id(check) != info.key_id:
        raise CryptoError("keygen: internal check failed: the public payload is private or has another key id")

    atomic_write_bytes(paths[0], _envelope("secret", info, secret_payload), mode=0o600)
    atomic_write_bytes(paths[1], _envelope("public", info, public_payload), mode=0o600)
    meta = {"format": _KEY_FORMAT, **info.to_dict(), "files": {"secret": SECRET_FILE, "public": PUBLIC_FILE}}
    atomic_write_bytes(paths[2], (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)
    log.info("keygen: key %s epoch %d written to %s", info.key_id, epoch, out)
    return KeyFiles(info=info, secret_path=paths[0], public_path=paths[1], info_path=paths[2])


def load_secret_context(path: str | Path) -> CkksKey:
    """Load the banks' secret context (can encrypt and decrypt).

    Args:
        path: a `context.secret.ckks` written by `keygen`.

    Returns:
        The private context with its key id and epoch.

    Raises:
        CryptoError: missing or malformed file, group/world-accessible file mode, a public file given,
            payload hash or key id mismatch.
    """
    return _load(Path(path), "secret")


def load_public_context(path: str | Path) -> CkksKey:
    """Load the server's public context (can encrypt and add, cannot decrypt) from a `context.public.ckks`.

    As `load_secret_context`, but the file mode is not checked and a secret file is refused (the
    server must never hold it): CryptoError for that, or a missing or malformed file, payload hash or
    key id mismatch.
    """
    return _load(Path(path), "public")


# ----------------------------------------------------------------------------------------------
# file format helpers


def _envelope(kind: KeyKind, info: KeyInfo, payload: bytes) -> bytes:
    header = {
        "format": _KEY_FORMAT,
        "kind": kind,
        **info.to_dict(),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    return pack_envelope(_KEY_MAGIC, header, payload)


def _load(path: Path, kind: KeyKind) -> CkksKey:
    if not path.is_file():
        raise CryptoError(f"{kind} context file {path}: not found")
    mode = stat.S_IMODE(path.stat().st_mode)
    # Like ssh with private keys: refuse a secret file others can read rather than use a leaked key.
    if kind == "secret" and mode & 0o077:
        raise CryptoError(
            f"secret context file {path}: mode {mode:04o} lets group/others access it, expected 0600 or 0400 "
            f"(chmod 600 it; on Kubernetes set the secret volume's defaultMode to 0400)"
        )
    data = path.read_bytes()
    header, payload = _open_envelope(path, data)
    if header.get("kind") != kind:
        hint = " (the server must mount only the public file)" if kind == "public" else ""
        raise CryptoError(f"{path}: expected a {kind} context file, got kind {header.get('kind')!r}{hint}")
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise CryptoError(f"{path}: payload SHA-256 does not match the header: file corrupted")
    try:
        info = KeyInfo(
            key_id=str(header["key_id"]), epoch=int(header["epoch"]), params=CkksParams.from_dict(header["params"])
        )
    except KeyError as e:
        raise CryptoError(f"{path}: header lacks field {e}") from e
    try:
        ctx = ts.context_from(payload)
    except Exception as e:  # TenSEAL raises ValueError/RuntimeError for bad protobuf or SEAL data
        raise CryptoError(f"{path}: TenSEAL cannot load the context: {e}") from e
    if ctx.is_private() != (kind == "secret"):
        raise CryptoError(
            f"{path}: header says {kind} but the context is {'private' if ctx.is_private() else 'public'}"
        )
    got = key_id(ctx)
    if got != info.key_id:
        raise CryptoError(f"{path}: key id expected {info.key_id} (header), got {got} (recomputed from the context)")
    if ctx.global_scale != info.params.scale:
        raise CryptoError(f"{path}: global scale expected 2^{info.params.scale_bits}, got {ctx.global_scale}")
    log.info("loaded %s context %s epoch %d from %s", kind, info.key_id, info.epoch, path)
    return CkksKey(context=ctx, info=info, path=path)


def _open_envelope(path: Path, data: bytes) -> tuple[dict[str, Any], bytes]:
    header, payload = open_envelope(data, _KEY_MAGIC, what=f"{path} (a fedmoe CKKS key file)")
    if header.get("format") != _KEY_FORMAT:
        raise CryptoError(f"{path}: key file format expected {_KEY_FORMAT}, got {header.get('format')!r}")
    return header, bytes(payload)
