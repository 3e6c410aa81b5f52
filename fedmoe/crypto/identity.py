"""Long-term bank identities: Ed25519 signing keys and the consortium's pinned public keys.

Every bank has one identity key pair, generated once at provisioning on the bank's own host:
  <bank>.identity.secret  the Ed25519 private key in a fedmoe/crypto/envelope.py frame (mode 0600, written
                          atomically); never leaves the bank
  pins file               JSON {"format": 1, "banks": {bank id: public key hex}}: the consortium's
                          public keys, distributed out of band and kept in each bank's config
Whatever a bank advertises through the (untrusted) server is signed with its identity key and
checked by its peers against the pins, so the server can relay but never forge or substitute keys.
The same `sign(bytes)` / `verify(bank_id, bytes, signature)` pair signs ledger entries.

Callers separate domains themselves: sign canonical JSON that names what it is ("type": ...) and
where it belongs (job id, round), so a signature can never be replayed in another context.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmoe.crypto.envelope import open_envelope, pack_envelope
from fedmoe.crypto.errors import CryptoError
from fedmoe.protocol.files import atomic_write_bytes, atomic_write_json, read_document

log = logging.getLogger(__name__)

_ID_MAGIC = b"FMIDKEY1"
_FORMAT = 1
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, eq=False)
class Identity:
    """A bank's loaded identity: its id and Ed25519 private key (never printed, never serialized here)."""

    bank_id: str
    _key: Ed25519PrivateKey = field(repr=False)

    @property
    def public_key(self) -> bytes:
        """32 raw bytes, what the pins file holds (as hex)."""
        return public_key_bytes(self._key.public_key())

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over `data`."""
        return self._key.sign(bytes(data))


def generate_identity(path: str | Path, bank_id: str, *, overwrite: bool = False) -> Identity:
    """Create a bank's identity key and write it (mode 0600, atomically) to `path`.

    Args:
        path: file to write; its folder is created (mode 0700) if missing.
        bank_id: the bank's name in the consortium (what the pins file maps to its public key).
        overwrite: replace an existing file instead of refusing.

    Returns:
        The new identity (its `public_key` goes into the consortium's pins file).

    Raises:
        CryptoError: empty bank id, or the file exists and not `overwrite`.
    """
    _check_bank_id(bank_id, "generate_identity")
    path = Path(path)
    if path.exists() and not overwrite:
        raise CryptoError(f"generate_identity: {path} already exists; pass overwrite to replace it")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    ident = Identity(bank_id=bank_id, _key=key)
    header = {"format": _FORMAT, "kind": "identity-secret", "bank_id": bank_id, "public_key": ident.public_key.hex()}
    atomic_write_bytes(path, pack_envelope(_ID_MAGIC, header, raw), mode=0o600)
    log.info("identity for bank %s written to %s (public key %s)", bank_id, path, ident.public_key.hex()[:16])
    return ident


def load_identity(path: str | Path) -> Identity:
    """Load a bank's identity key written by `generate_identity`.

    Raises:
        CryptoError: missing file, mode lets group/others access it, malformed file, or the stored
            public key does not match the private key.
    """
    path = Path(path)
    if not path.is_file():
        raise CryptoError(f"identity file {path}: not found")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CryptoError(f"identity file {path}: mode {mode:04o} lets group/others access it, expected 0600 or 0400")
    header, payload = open_envelope(path.read_bytes(), _ID_MAGIC, what=f"identity file {path}")
    if header.get("format") != _FORMAT or header.get("kind") != "identity-secret":
        raise CryptoError(
            f"identity file {path}: expected format {_FORMAT} kind 'identity-secret', "
            f"got format {header.get('format')!r} kind {header.get('kind')!r}"
        )
    bank_id = header.get("bank_id")
    _check_bank_id(bank_id, f"identity file {path}")
    try:
        key = Ed25519PrivateKey.from_private_bytes(bytes(payload))
    except ValueError as e:
        raise CryptoError(f"identity file {path}: payload is not a 32-byte Ed25519 key: {e}") from e
    ident = Identity(bank_id=bank_id, _key=key)
    if ident.public_key.hex() != header.get("public_key"):
        raise CryptoError(f"identity file {path}: public key in the header does not match the private key")
    return ident


@dataclass(frozen=True)
class ConsortiumPins:
    """The pinned public identity keys of the consortium: bank id -> Ed25519 public key.

    A signature counts only if it verifies under the key pinned for the bank it claims to come from.
    """

    keys: Mapping[str, bytes]

    def __post_init__(self) -> None:
        for bank, key in self.keys.items():
            _check_bank_id(bank, "ConsortiumPins")
            if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
                raise CryptoError(f"ConsortiumPins: bank {bank!r}: expected a 32-byte public key, got {key!r:.40}")
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    @property
    def banks(self) -> tuple[str, ...]:
        return tuple(sorted(self.keys))

    def __contains__(self, bank_id: object) -> bool:
        return bank_id in self.keys

    def verify(self, bank_id: str, data: bytes, signature: bytes) -> None:
        """Check that `signature` over `data` was made by `bank_id`'s pinned key.

        Raises:
            CryptoError: reason "unknown_bank" (no pin for that id) or "signature" (does not verify).
        """
        pin = self.keys.get(bank_id)
        if pin is None:
            raise CryptoError(f"bank {bank_id!r} is not a pinned consortium member", reason="unknown_bank")
        try:
            Ed25519PublicKey.from_public_bytes(pin).verify(bytes(signature), bytes(data))
        except (InvalidSignature, ValueError, TypeError) as e:
            raise CryptoError(
                f"bank {bank_id!r}: signature does not verify under its pinned key", reason="signature"
            ) from e

    def is_valid(self, bank_id: str, data: bytes, signature: bytes) -> bool:
        try:
            self.verify(bank_id, data, signature)
        except CryptoError:
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "banks": {b: k.hex() for b, k in sorted(self.keys.items())}}

    @classmethod
    def from_dict(cls, d: Any, *, what: str = "pins") -> ConsortiumPins:
        if not isinstance(d, dict) or d.get("format") != _FORMAT or not isinstance(d.get("banks"), dict):
            raise CryptoError(f"{what}: expected {{'format': {_FORMAT}, 'banks': {{id: hex key}}}}, got {d!r:.80}")
        try:
            keys = {str(b): bytes.fromhex(k) for b, k in d["banks"].items()}
        except (TypeError, ValueError) as e:
            raise CryptoError(f"{what}: a public key is not hex: {e}") from e
        return cls(keys)

    @classmethod
    def from_identities(cls, identities: list[Identity]) -> ConsortiumPins:
        return cls({i.bank_id: i.public_key for i in identities})


def write_pins(path: str | Path, pins: ConsortiumPins) -> Path:
    """Write the consortium pins file (public data; mode 0644, atomically)."""
    return atomic_write_json(Path(path), pins.to_dict(), mode=0o644)


def load_pins(path: str | Path) -> ConsortiumPins:
    """Read a pins file written by `write_pins`.

    Raises:
        CryptoError: missing file, not JSON, or malformed content.
    """
    where = f"pins file {path}"
    return ConsortiumPins.from_dict(read_document(path, CryptoError, where=where), what=where)


def _check_bank_id(bank_id: Any, where: str) -> None:
    if not isinstance(bank_id, str) or not bank_id:
        raise CryptoError(f"{where}: bank id expected a non-empty string, got {bank_id!r}")
