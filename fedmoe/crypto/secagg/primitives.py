"""Building blocks of secure aggregation: X25519 agreement, HKDF, AES-GCM, the mask PRG, Shamir.

All from `cryptography` (X25519, HKDF-SHA256, AES-GCM, AES-CTR) plus a small Shamir scheme over the
Mersenne prime field 2^521 - 1 (a 32-byte secret is one field element, a share is 66 bytes).

Why not Flower's helpers (flwr.common.secure_aggregation.crypto): its Shamir shares are pickled
lists (unpickling a share that came from a peer would let that peer run code in our process) over
16-byte chunks through PyCryptodome, and its symmetric encryption is Fernet with no associated
data, so a share could not be bound to (job, round, dealer, recipient). Each primitive here is a
few lines over `cryptography` instead.

Domain separation: every derived key names its purpose, the job, the round and the two banks in
the HKDF info, and every AEAD ciphertext authenticates (job, round, dealer, recipient).
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Iterable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmoe.crypto.envelope import canonical_json
from fedmoe.crypto.errors import CryptoError

KEY_BYTES = 32
NONCE_BYTES = 12

# ------------------------------------------------------------------------------------------------
# X25519 + HKDF


def new_x25519() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as (private 32 bytes, public 32 bytes)."""
    sk = X25519PrivateKey.generate()
    return _raw_private(sk), _raw_public(sk.public_key())


def x25519_public(private: bytes) -> bytes:
    return _raw_public(X25519PrivateKey.from_private_bytes(private).public_key())


def derive_key(private: bytes, peer_public: bytes, *, purpose: str, context: dict) -> bytes:
    """HKDF-SHA256(X25519(private, peer_public)) -> 32 bytes, bound to purpose and context.

    `context` must be the same on both sides (sort pair ids in it); it goes into HKDF's info.

    Raises:
        CryptoError: reason "malformed" for a key that is not 32 bytes or a low-order point.
    """
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:  # wrong length, or an all-zero shared secret (low-order point)
        raise CryptoError(f"X25519 agreement failed ({purpose}): {e}", reason="malformed") from e
    return hkdf(shared, purpose=purpose, context=context)


_P = 2**255 - 19
_A = 486662
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))  # any scalar: X25519 clamps it to a multiple of 8


def check_x25519_public(public: bytes, *, what: str) -> None:
    """Refuse an X25519 public key no honest key pair produces (RFC 7748; checked at advertisement).

    Refused: not 32 bytes; a non-canonical encoding (top bit set, or u >= 2^255 - 19); a point of
    the quadratic twist rather than of Curve25519 (u^3 + A u^2 + u not a square mod p); a point of
    small order (X25519 with any scalar, a multiple of 8 after clamping, gives the all-zero secret:
    u = 0, 1, p - 1 and the two order-8 points). Such a key would make every agreement with it fail
    or be predictable, so the advertiser is blamed before any honest bank uses it.

    Raises:
        CryptoError: reason "weak_key", naming `what`.
    """
    if not isinstance(public, bytes) or len(public) != 32:
        raise CryptoError(f"{what}: X25519 public key expected 32 bytes", reason="weak_key")
    u = int.from_bytes(public, "little")
    if u >= _P:  # the top bit, or u in [p, 2^255): a second encoding of a small u
        raise CryptoError(f"{what}: non-canonical X25519 public key", reason="weak_key")
    f = (u * u * u + _A * u * u + u) % _P
    if f != 0 and pow(f, (_P - 1) // 2, _P) != 1:
        raise CryptoError(f"{what}: X25519 public key is on the twist, not on Curve25519", reason="weak_key")
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as e:  # all-zero shared secret: a point of order 1, 2, 4 or 8
        raise CryptoError(f"{what}: X25519 public key of small order", reason="weak_key") from e


def hkdf(secret: bytes, *, purpose: str, context: dict) -> bytes:
    info = b"fedmoe/" + purpose.encode() + b"\0" + canonical_json(context)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def _raw_private(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _raw_public(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ------------------------------------------------------------------------------------------------
# AES-GCM


def seal(key: bytes, plaintext: bytes, associated: dict) -> tuple[bytes, bytes]:
    """AES-256-GCM with a random 96-bit nonce; returns (nonce, ciphertext + tag)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, canonical_json(associated))


def open_sealed(key: bytes, nonce: bytes, ciphertext: bytes, associated: dict, *, what: str) -> bytes:
    """Decrypt and authenticate; any change to the ciphertext or the associated data fails.

    Raises:
        CryptoError: reason "share" when the tag does not verify.
    """
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, canonical_json(associated))
    except (InvalidTag, ValueError) as e:
        raise CryptoError(f"{what}: AES-GCM authentication failed", reason="share") from e


# ------------------------------------------------------------------------------------------------
# mask PRG


def prg_mod(seed: bytes, n: int, modulus: int, *, purpose: str, context: dict) -> np.ndarray:
    """n values uniform in [0, modulus) from a 32-byte seed: AES-256-CTR keystream, rejection sampling.

    The key is HKDF(seed, purpose, context), so the same seed never drives two streams. Each 64-bit
    word is cut to modulus.bit_length() bits and kept if below the modulus (for t = 2^56 - 2^19 ...,
    a word is rejected with probability ~1e-11), so the output is exactly uniform.

    Returns:
        uint64 array of shape (n,).
    """
    assert 2 < modulus < 2**63, "modulus must fit a signed 64-bit word"
    key = hkdf(seed, purpose=purpose, context=context)
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    mask = np.uint64((1 << modulus.bit_length()) - 1)
    out = np.empty(n, dtype=np.uint64)
    filled = 0
    while filled < n:
        want = n - filled
        # Ask for a little more than needed so one pass almost always suffices.
        words = np.frombuffer(enc.update(bytes(8 * (want + 64 + want // 64))), dtype="<u8") & mask
        words = words[words < np.uint64(modulus)]
        take = min(want, words.size)
        out[filled : filled + take] = words[:take]
        filled += take
    return out


# ------------------------------------------------------------------------------------------------
# Shamir secret sharing over GF(2^521 - 1)

SHAMIR_PRIME = 2**521 - 1  # Mersenne prime: larger than any 32-byte secret
SHARE_BYTES = 66  # ceil(521 / 8)


def shamir_split(secret: bytes, xs: Iterable[int], threshold: int) -> dict[int, bytes]:
    """Split a secret (<= 64 bytes) into shares at the points xs; any `threshold` of them recover it.

    Args:
        secret: the secret bytes (a 32-byte key here).
        xs: distinct nonzero evaluation points (1 + a participant's index).
        threshold: polynomial degree + 1, >= 1.

    Returns:
        x -> y as 66 big-endian bytes.
    """
    xs = list(xs)
    if threshold < 1 or threshold > len(xs) or len(set(xs)) != len(xs) or any(x <= 0 for x in xs):
        raise CryptoError(f"shamir_split: threshold {threshold} with points {xs}: need distinct x > 0, t <= n")
    if len(secret) > 64:
        raise CryptoError(f"shamir_split: secret of {len(secret)} bytes is larger than the field")
    p = SHAMIR_PRIME
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(p) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % p
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


@functools.lru_cache(maxsize=256)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The Lagrange coefficients that interpolate at 0 from the points xs (distinct, in the field).

    Cached: the server reconstructs every survivor's self-mask seed from the same first t holders,
    so one round needs one set (t modular inversions) instead of t inversions per survivor, which
    dominated its unmasking at 64+ banks.
    """
    p = SHAMIR_PRIME
    coefficients = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (-xj) % p
                den = den * (xi - xj) % p
        coefficients.append(num * pow(den, -1, p) % p)
    return tuple(coefficients)


def shamir_combine(shares: dict[int, bytes], *, secret_bytes: int = KEY_BYTES) -> bytes:
    """Lagrange-interpolate the secret at 0 from shares {x: y}; needs >= threshold of them.

    With fewer shares the result is a wrong secret, not an error: callers check it against the
    dealer's commitment.
    """
    p = SHAMIR_PRIME
    pts = [(x, int.from_bytes(y, "big")) for x, y in shares.items()]
    if not pts or any(not 0 <= y < p for _, y in pts):
        raise CryptoError("shamir_combine: no shares, or a share outside the field", reason="share")
    coefficients = lagrange_at_zero(tuple(x for x, _ in pts))
    secret = sum(y * c for (_, y), c in zip(pts, coefficients, strict=True)) % p
    if secret >= 1 << (8 * secret_bytes):
        raise CryptoError("shamir_combine: the interpolated value is not a secret of this size", reason="commitment")
    return secret.to_bytes(secret_bytes, "big")
