"""BFV key ceremony for banks on separate hosts: one bank generates the key, each other bank gets it sealed.

  1. the dealer bank runs `bfv_keygen` on its own host (secret + public file); the public file goes
     to the server.
  2. every other bank sends `request_key(identity, job_id)`: a fresh X25519 public key signed with
     its identity key (the server relays it).
  3. the dealer answers each request with `deliver_key(...)`: the secret key file encrypted with
     AES-256-GCM under HKDF(X25519(dealer ephemeral, requester ephemeral)), associated data binding
     job, dealer, recipient, key id and the request; the whole delivery signed by the dealer.
  4. the bank checks it with `accept_key(...)` (pins, its own request, the dealer it expects) and
     writes the secret file (mode 0600, atomically).
The server relays only ciphertext and signed public keys; both ephemeral secrets are discarded after
one use (forward secrecy for the job key in transit). The single-host ceremony (`bfv_keygen` into a
folder every bank mounts) stays for the loopback demo.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import ConsortiumPins, Identity
from fedmoe.crypto.secagg.bfv import BfvKey, load_key_bytes
from fedmoe.crypto.secagg.bfv_secret import load_bfv_secret
from fedmoe.crypto.secagg.messages import Message, message
from fedmoe.crypto.secagg.primitives import derive_key, new_x25519, open_sealed, seal
from fedmoe.protocol.files import atomic_write_bytes


@message("secagg/bfv_key_request")
class KeyRequest(Message):
    """A bank asks for the job's BFV secret key, offering a signed ephemeral X25519 public key."""

    bank_id: str
    job_id: str
    ephemeral_pk: bytes
    signature: bytes

    def digest(self) -> bytes:
        return hashlib.sha256(self.signed_bytes() + self.signature).digest()


@message("secagg/bfv_key_delivery")
class KeyDelivery(Message):
    """The BFV secret key file, sealed to one requester, signed by the dealer."""

    dealer: str
    recipient: str
    job_id: str
    key_id: str
    request_digest: bytes
    ephemeral_pk: bytes
    nonce: bytes
    ciphertext: bytes
    signature: bytes


def request_key(identity: Identity, job_id: str) -> tuple[KeyRequest, bytes]:
    """Returns the request to send and the ephemeral secret to keep (0600) until the delivery arrives."""
    secret, public = new_x25519()
    return KeyRequest.signed(identity, bank_id=identity.bank_id, job_id=job_id, ephemeral_pk=public), secret


def _transport(job_id: str, dealer: str, recipient: str, key_id: str, request_digest: bytes) -> dict:
    return {
        "type": "secagg/bfv_key_transport",
        "job_id": job_id,
        "dealer": dealer,
        "recipient": recipient,
        "key_id": key_id,
        "request": request_digest.hex(),
    }


def deliver_key(dealer: Identity, pins: ConsortiumPins, request: KeyRequest, secret_path: str | Path) -> KeyDelivery:
    """Seal the dealer's BFV secret key file to a verified requester.

    Raises:
        CryptoError: reason "unknown_bank"/"signature" for a request not signed by a pinned bank.
    """
    pins.verify(request.bank_id, request.signed_bytes(), request.signature)
    key = load_bfv_secret(secret_path)
    data = Path(secret_path).read_bytes()
    eph_secret, eph_public = new_x25519()
    ctx = _transport(request.job_id, dealer.bank_id, request.bank_id, key.key_id, request.digest())
    aead_key = derive_key(eph_secret, request.ephemeral_pk, purpose="bfv-key-transport", context=ctx)
    nonce, ct = seal(aead_key, data, ctx)
    return KeyDelivery.signed(
        dealer,
        dealer=dealer.bank_id,
        recipient=request.bank_id,
        job_id=request.job_id,
        key_id=key.key_id,
        request_digest=request.digest(),
        ephemeral_pk=eph_public,
        nonce=nonce,
        ciphertext=ct,
    )


def accept_key(
    identity: Identity,
    pins: ConsortiumPins,
    request: KeyRequest,
    ephemeral_secret: bytes,
    delivery: KeyDelivery,
    out_path: str | Path,
    *,
    dealer: str,
) -> BfvKey:
    """Verify and open a delivery, write the secret BFV key file (0600, atomically), return the key.

    Args:
        dealer: the bank this bank's config names as the key's dealer; any other sender is refused.

    Raises:
        CryptoError: reason "signature"/"unknown_bank" (delivery not signed by the pinned dealer),
            "inconsistent" (another dealer, recipient, job or request), "share" (does not decrypt),
            or a key that does not load with the key id it claims.
    """
    if delivery.dealer != dealer:
        raise CryptoError(f"key delivery from {delivery.dealer!r}, expected dealer {dealer!r}", reason="inconsistent")
    pins.verify(delivery.dealer, delivery.signed_bytes(), delivery.signature)
    if (delivery.recipient, delivery.job_id, delivery.request_digest) != (
        identity.bank_id,
        request.job_id,
        request.digest(),
    ):
        raise CryptoError("key delivery is for another bank, job or request", reason="inconsistent")
    ctx = _transport(delivery.job_id, delivery.dealer, delivery.recipient, delivery.key_id, delivery.request_digest)
    aead_key = derive_key(ephemeral_secret, delivery.ephemeral_pk, purpose="bfv-key-transport", context=ctx)
    data = open_sealed(aead_key, delivery.nonce, delivery.ciphertext, ctx, what=f"key delivery from {dealer!r}")
    key = load_key_bytes(data, "secret", what=f"BFV key from {dealer!r}")
    if key.key_id != delivery.key_id:
        raise CryptoError(f"delivered key id {key.key_id} differs from the signed {delivery.key_id}")
    atomic_write_bytes(Path(out_path), data, mode=0o600)
    return dataclasses.replace(key, path=Path(out_path))
