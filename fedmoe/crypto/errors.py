"""The crypto package's exception type and the aggregator's rejection record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Why a contribution was left out of an aggregate. The server records these per round, so they are
# short stable codes; the human-readable detail goes in the message.
RejectReason = Literal[
    "key_id",  # bundle encrypted under another key (or the server mounted the wrong public context)
    "epoch",  # right key family, wrong key epoch (a bank that missed a rotation)
    "round",  # stale or future round
    "layout",  # layout hash or element count differs: the bank trained another tensor layout
    "chunk_count",  # chunk count or slots per chunk inconsistent with the element count
    "hash",  # a chunk's SHA-256 differs from the header: bytes corrupted in transit or storage
    "deserialize",  # bundle container or a chunk that cannot be parsed
    "ciphertext",  # a chunk parses but has the wrong CKKS metadata (scale, level, size)
    "bank_id",  # the bundle names another bank than the one the server received it from
    "duplicate",  # a second contribution from the same bank, or a replayed ciphertext
    "kind",  # not a bank update (e.g. an already aggregated sum sent back)
    # secure aggregation (fedmoe/crypto/secagg) and identities (fedmoe/crypto/identity.py)
    "unknown_bank",  # not a pinned consortium member, or not selected for this round
    "signature",  # a signature does not verify under the sender's pinned identity key
    "replay",  # a signed message bound to another job or round (e.g. last round's key advertisement)
    "weak_key",  # an advertised X25519 public key that is not a full-order point of Curve25519
    "share",  # an encrypted Shamir share that does not decrypt, or whose dealer signature fails
    "commitment",  # a reconstructed secret does not match its dealer's signed commitment
    "dropped",  # the bank sent nothing at a stage (timeout, crash, refusal)
    "too_few",  # fewer banks or shares than the threshold / min-banks: nothing is unmasked
    "inconsistent",  # a request contradicts what the bank saw (e.g. both share kinds of one peer)
    "malformed",  # a protocol message that does not parse or has wrong fields
]

REJECT_REASONS: tuple[str, ...] = RejectReason.__args__  # type: ignore[attr-defined]


class CryptoError(Exception):
    """Bad key file, bundle, header or argument; the message names the file/bank/field, expected vs got.

    Attributes:
        reason: a `RejectReason` code when the error disqualifies one bank's contribution
            (the aggregator copies it into `RejectedContribution`), else None.
    """

    def __init__(self, message: str, *, reason: RejectReason | None = None) -> None:
        super().__init__(message)
        if reason is not None and reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; allowed: {', '.join(REJECT_REASONS)}")
        self.reason = reason


@dataclass(frozen=True)
class RejectedContribution:
    """One contribution the aggregator left out, and why."""

    bank_id: str
    reason: RejectReason
    message: str
