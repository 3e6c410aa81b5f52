"""Typed messages of the secure-aggregation protocol: one dataclass per Flower message exchange.

  stage            server -> bank            bank -> server
  0 setup/advert   RoundSetup                KeyAdvertisement   (signed, bound to job + round)
  1 share keys     ShareKeysRequest          ShareKeysReply     (shares AES-GCM-encrypted to each peer)
  2 masked input   MaskedInputRequest        MaskedInput        (BFV bundle + signed Receipt)
  3 consistency    UnmaskRequest             UnmaskConsent      (signs the survivor/dropped view)
  4 unmask         UnmaskOrder               UnmaskReply        (>= quorum consents on that view;
                                                                 one kind of share per peer)
  result           SecureAggregate           -                  (BFV sum with residual masks removed)

Every message is a frozen dataclass declared with `@message(type_tag)`, with `to_bytes()` /
`from_bytes()` (a fedmoe/crypto/envelope.py frame: JSON header, the `bundle` field, if any, as the binary
payload) and `to_dict()` / `from_dict()` (JSON-able; bytes as hex), all driven by its fields. Parsing
is strict: a missing or mistyped field raises CryptoError(reason="malformed"). Signatures cover
`signed_bytes()`: canonical JSON of the message's type tag and all its fields except the signature
itself; `Cls.signed(identity, **fields)` builds a message and fills its signature in.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from fedmoe.crypto.envelope import canonical_json, open_envelope, pack_envelope
from fedmoe.crypto.errors import REJECT_REASONS, CryptoError, RejectReason
from fedmoe.crypto.secagg.params import SecAggParams

if TYPE_CHECKING:
    from fedmoe.crypto.identity import Identity

M = TypeVar("M", bound="Message")
_MSG_MAGIC = b"FMSECAG1"

ShareKind = Literal["self_mask", "mask_key"]
Stage = Literal["setup", "advertise", "share_keys", "masked_input", "consistency", "unmask", "aggregate"]


class Message:
    """Codec shared by all messages; each is declared with `@message(type_tag)`, which sets TYPE."""

    TYPE: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[M], d: Any) -> M:
        if not isinstance(d, dict):
            raise CryptoError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}", reason="malformed")
        hints = _field_types(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in d:
                raise CryptoError(f"{cls.__name__}: missing field {f.name!r}", reason="malformed")
            kwargs[f.name] = _decode(hints[f.name], d[f.name], f"{cls.__name__}.{f.name}")
        return cls(**kwargs)

    def to_bytes(self) -> bytes:
        d = self.to_dict()
        payload = getattr(self, "bundle", b"")
        d.pop("bundle", None)
        return pack_envelope(_MSG_MAGIC, {"type": self.TYPE, "body": d}, bytes(payload))

    @classmethod
    def from_bytes(cls: type[M], data: bytes) -> M:
        header, payload = open_envelope(data, _MSG_MAGIC, what=cls.__name__, reason="malformed")
        if header.get("type") != cls.TYPE:
            raise CryptoError(
                f"{cls.__name__}: message type expected {cls.TYPE!r}, got {header.get('type')!r}", reason="malformed"
            )
        body = header.get("body")
        if isinstance(body, dict) and "bundle" in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
            body = {**body, "bundle": bytes(payload).hex()}
        return cls.from_dict(body)

    def signed_bytes(self) -> bytes:
        d = self.to_dict()
        d.pop("signature", None)
        return canonical_json({"type": self.TYPE, **d})

    @classmethod
    def signed(cls: type[M], identity: Identity, **fields: Any) -> M:
        """A new message from `fields`, its `signature` made by `identity` over `signed_bytes()`."""
        unsigned = cls(**fields, signature=b"")  # type: ignore[call-arg]
        return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))  # type: ignore[call-arg]


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """typing.get_type_hints(cls), once per class: it re-evaluates every annotation's string on each call,
    which was a tenth of a 64-bank round's in-process time (each bank parses n advertisements and receipts)."""
    return typing.get_type_hints(cls)


def message(type_tag: str) -> Callable[[type[M]], type[M]]:
    """Class decorator: make `cls` a frozen dataclass message whose wire type tag is `type_tag`."""

    def wrap(cls: type[M]) -> type[M]:
        cls.TYPE = type_tag
        return dataclass(frozen=True)(cls)

    return wrap


@dataclass(frozen=True)
class RoundMessage(Message):
    """The first fields of the server's round-bound messages (setup, masked-input and unmask requests, sum)."""

    job_id: str
    round: int


@dataclass(frozen=True)
class BankRoundMessage(Message):
    """The first fields of a bank's round-bound messages (advertisement, shares, receipt, consent, unmask)."""

    bank_id: str
    job_id: str
    round: int


def _encode(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, tuple):
        return [_encode(x) for x in v]
    if isinstance(v, (Message, SecAggParams)):
        return v.to_dict()
    return v


def _decode(tp: Any, v: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    try:
        if tp is bytes:
            if not isinstance(v, str):
                raise TypeError("expected hex")
            return bytes.fromhex(v)
        if tp is int:
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError("expected an int")
            return v
        if tp is str:
            if not isinstance(v, str):
                raise TypeError("expected a string")
            return v
        if tp is SecAggParams:
            return SecAggParams.from_dict(v)
        if isinstance(tp, type) and issubclass(tp, Message):
            return tp.from_dict(v)
        if origin is Literal:
            if v not in typing.get_args(tp):
                raise TypeError(f"expected one of {typing.get_args(tp)}")
            return v
        if origin is tuple:
            (item, _) = typing.get_args(tp)
            if not isinstance(v, list):
                raise TypeError("expected a list")
            return tuple(_decode(item, x, f"{where}[]") for x in v)
        if origin in (typing.Union, types.UnionType):
            args = typing.get_args(tp)
            if v is None and type(None) in args:
                return None
            return _decode(next(a for a in args if a is not type(None)), v, where)
    except (TypeError, ValueError) as e:
        raise CryptoError(f"{where}: {e}, got {v!r:.80}", reason="malformed") from e
    raise AssertionError(f"no codec for {tp!r}")


# ------------------------------------------------------------------------------------------------
# stage 0


@message("secagg/setup")
class RoundSetup(RoundMessage):
    """What the server proposes for one round; every bank checks it against its own policy.

    Attributes:
        job_id, round: bind every signature and key of the round.
        participants: selected bank ids, sorted; fixes neighbourhoods and Shamir x-coordinates.
        threshold: Shamir threshold t over each bank's holders (its neighbours + itself).
        neighbours_k: 0 = everyone neighbours everyone; else an even k (Harary graph).
        n_elements: update length (the BFV vector holds n_elements + 1 values: the weight last).
        layout_hash: the model side's hash of the trainable view's names and shapes (carried and
            signed with the setup; the bank compares it with its own view before training).
        min_banks: fewest contributors a bank accepts in the sum.
        bfv_key_id: the job's BFV key.
        params: BFV sizes, t, fixed-point scale, max banks.
    """

    participants: tuple[str, ...]
    threshold: int
    neighbours_k: int
    n_elements: int
    layout_hash: str
    min_banks: int
    bfv_key_id: str
    params: SecAggParams

    def digest(self) -> bytes:
        return hashlib.sha256(self.signed_bytes()).digest()


@message("secagg/advertise")
class KeyAdvertisement(BankRoundMessage):
    """A bank's two ephemeral X25519 public keys for this round, signed with its identity key.

    share_pk encrypts the Shamir shares sent to it; mask_pk derives its pairwise masks (its secret
    is what gets Shamir-shared as the "mask key"). self_mask_commitment = SHA-256 over the job,
    round, bank and self-mask seed: checked after the server reconstructs the seed.
    """

    setup_digest: bytes
    share_pk: bytes
    mask_pk: bytes
    self_mask_commitment: bytes
    signature: bytes


# ------------------------------------------------------------------------------------------------
# stage 1


@message("secagg/share_keys_request")
class ShareKeysRequest(Message):
    """The verified advertisements the server collected (the bank re-verifies every one)."""

    setup: RoundSetup
    advertisements: tuple[KeyAdvertisement, ...]


@message("secagg/encrypted_share")
class EncryptedShare(Message):
    """A dealer's two Shamir shares for one holder, AES-GCM-encrypted to that holder."""

    dealer: str
    recipient: str
    nonce: bytes
    ciphertext: bytes


@message("secagg/share_keys_reply")
class ShareKeysReply(BankRoundMessage):
    shares: tuple[EncryptedShare, ...]


# ------------------------------------------------------------------------------------------------
# stage 2


@message("secagg/masked_input_request")
class MaskedInputRequest(RoundMessage):
    """senders: the banks whose shares the server relayed (U2); shares: those addressed to this bank."""

    senders: tuple[str, ...]
    shares: tuple[EncryptedShare, ...]


@message("secagg/complaint")
class Complaint(Message):
    """A bank names a peer whose share or key it could not verify; the server excludes that peer."""

    dealer: str
    reason: str
    detail: str


@message("secagg/receipt")
class Receipt(BankRoundMessage):
    """A bank's signed statement that it sent this masked input (bundle digest), masking with these peers.

    The server shows survivors' receipts to banks at unmask time and to everyone with the sum.
    """

    bundle_sha256: bytes
    masked_with: tuple[str, ...]
    complaints: tuple[Complaint, ...]
    signature: bytes


@message("secagg/masked_input")
class MaskedInput(Message):
    receipt: Receipt
    bundle: bytes


# ------------------------------------------------------------------------------------------------
# stage 3: consistency check (Bonawitz et al.'s ConsistencyCheck round)


@message("secagg/unmask_request")
class UnmaskRequest(RoundMessage):
    """survivors: whose masked input counts (self-mask shares wanted); dropped: whose mask keys are wanted."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    receipts: tuple[Receipt, ...]

    def view_sha256(self) -> bytes:
        """Digest of the (job, round, survivors, dropped) view that banks sign in their consent."""
        view = {
            "type": "secagg/unmask_view",
            "job_id": self.job_id,
            "round": self.round,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
        }
        return hashlib.sha256(canonical_json(view)).digest()


@message("secagg/unmask_consent")
class UnmaskConsent(BankRoundMessage):
    """A bank's signature on the one survivor/dropped view it accepts this round (it signs no other).

    Without it a server could tell some banks that bank v dropped (to get v's mask key) and others
    that it survived (to get its self mask); a quorum of signatures on one view rules that out.
    """

    view_sha256: bytes
    signature: bytes


# ------------------------------------------------------------------------------------------------
# stage 4


@message("secagg/unmask_order")
class UnmaskOrder(Message):
    """The view plus at least `consent_quorum` banks' signed consents to exactly that view."""

    request: UnmaskRequest
    consents: tuple[UnmaskConsent, ...]


@message("secagg/revealed_share")
class RevealedShare(Message):
    """One share a holder releases, with the dealer's signature over it (so a forged share is caught)."""

    dealer: str
    holder: str
    kind: ShareKind
    x: int
    y: bytes
    dealer_signature: bytes


@message("secagg/unmask_reply")
class UnmaskReply(BankRoundMessage):
    shares: tuple[RevealedShare, ...]


# ------------------------------------------------------------------------------------------------
# result


@message("secagg/exclusion")
class Exclusion(Message):
    """Why a bank is not in the sum: the stage it fell out at and a typed reason code."""

    bank_id: str
    stage: Stage
    reason: str
    message: str

    def __post_init__(self) -> None:
        if self.reason not in REJECT_REASONS:
            raise CryptoError(f"Exclusion: unknown reason {self.reason!r}", reason="malformed")


@message("secagg/aggregate")
class SecureAggregate(RoundMessage):
    """The encrypted sum of the contributors' [w * delta..., w], residual masks removed.

    receipts: each contributor's signed receipt (banks check them against the pins).
    """

    contributors: tuple[str, ...]
    receipts: tuple[Receipt, ...]
    exclusions: tuple[Exclusion, ...]
    bundle: bytes


# ------------------------------------------------------------------------------------------------
# accountability (fedmoe.crypto.secagg.accountability)


@message("secagg/quarantine_evidence")
class QuarantineEvidence(Message):
    """What a quarantined round's sum was unmasked from, all of it signed by the banks: a bank
    recomputes the sum from it before it reveals anything (a fake quarantine is refused)."""

    setup: RoundSetup
    advertisements: tuple[KeyAdvertisement, ...]
    inputs: tuple[MaskedInput, ...]  # the survivors' (receipt + bundle)
    unmask: tuple[UnmaskReply, ...]  # the revealed shares (each signed by its dealer)
    aggregate: SecureAggregate

    def digest(self) -> bytes:
        """What a reveal and a verdict name: the setup, every survivor's signed receipt, the aggregate."""
        return hashlib.sha256(
            canonical_json(
                {
                    "type": "secagg/evidence",
                    "setup": self.setup.digest().hex(),
                    "receipts": [i.receipt.signature.hex() for i in self.inputs],
                    "aggregate": hashlib.sha256(self.aggregate.bundle).hexdigest(),
                }
            )
        ).digest()


@message("secagg/round_reveal")
class RoundReveal(BankRoundMessage):
    """A bank's mask secret key of one round (never its identity key, never another round's), signed:
    with it anyone holding the BFV key strips that bank's pairwise masks from that round's inputs."""

    evidence_sha256: bytes  # the evidence it checked (accountability.evidence_digest)
    mask_sk: bytes
    signature: bytes


@message("secagg/accusation")
class Accusation(Message):
    """A contribution found out of bound, and the signed receipt that proves who sent it."""

    bank_id: str
    round: int
    reason: str
    receipt: Receipt
    revealed_by: tuple[str, ...]  # the banks whose mask keys opened it


@message("secagg/accuse_request")
class AccuseRequest(Message):
    """A quarantined round's evidence and the reveals the server collected: each bank opens what it
    can with its own BFV key and answers with a signed `Verdict`."""

    evidence: QuarantineEvidence
    reveals: tuple[RoundReveal, ...]


@message("secagg/verdict")
class Verdict(BankRoundMessage):
    """A bank's signed finding on a quarantined round: the contributions it found out of bound (each
    with the accused's own signed receipt) and those that stayed masked (too few reveals)."""

    evidence_sha256: bytes
    accused: tuple[Accusation, ...]
    masked: tuple[str, ...]
    signature: bytes


class SecAggAbort(CryptoError):
    """The round cannot be unmasked (e.g. fewer than t survivors); nothing was decrypted or revealed.

    Attributes:
        reason: a RejectReason code ("too_few", "commitment", ...).
        exclusions: per-bank exclusions collected so far.
    """

    def __init__(self, message: str, *, reason: RejectReason, exclusions: tuple[Exclusion, ...] = ()) -> None:
        super().__init__(message, reason=reason)
        self.exclusions = exclusions


def share_signature_payload(
    *, job_id: str, round: int, dealer: str, holder: str, kind: ShareKind, x: int, y: bytes
) -> bytes:
    """What a dealer signs for each share it deals."""
    return canonical_json(
        {
            "type": "secagg/share",
            "job_id": job_id,
            "round": round,
            "dealer": dealer,
            "holder": holder,
            "kind": kind,
            "x": x,
            "y": y.hex(),
        }
    )


def self_mask_commitment(*, job_id: str, round: int, bank_id: str, seed: bytes) -> bytes:
    return hashlib.sha256(
        canonical_json({"type": "secagg/self_mask", "job_id": job_id, "round": round, "bank_id": bank_id})
        + b"\0"
        + seed
    ).digest()
