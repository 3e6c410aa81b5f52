"""Server-side aggregation: validate each bank's bundle, then add the valid ones, on ciphertexts only.

The server holds the public context, so it can parse, check and add ciphertexts but never decrypt.
Banks pre-scale their update by their weight and put the weight in an extra slot (see packing.py),
so the weighted mean needs only additions here: the sum bundle holds [sum w*delta..., sum w].

Why no ciphertext-times-plain-weight on the server: it would reveal each bank's weight to the server,
and it is less precise. Encoding the scalar at scale 2^40 and rescaling adds 1e-8..3e-7 absolute
error to the mean (K=5, |delta| ~ 1e-3..1), while pre-scaling leaves 7e-10 at w ~ 1 and 1e-12 at
w ~ 1e3 (measured; the CKKS noise is absolute, so dividing by a larger total weight shrinks it).

Why one process: with 2 cores, splitting the chunks over 2 worker processes made K=10 x 1M floats
slower (1.5-1.8 s vs 1.2-1.3 s serial) because the bundles (~58 MB each) must be copied to the
workers; threads do not help since TenSEAL holds the GIL; fork deadlocks on TenSEAL's thread pool.
`bench/he.py --parallel-workers N` re-measures that on a bigger server.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import tenseal as ts

from fedmoe.crypto.envelope import chunk_index
from fedmoe.crypto.errors import CryptoError, RejectedContribution
from fedmoe.crypto.keys import CkksKey
from fedmoe.crypto.packing import (
    BundleHeader,
    CiphertextRef,
    ExpectedHeader,
    check_header,
    load_chunk,
    pack_bundle,
    parse_bundle,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregateResult:
    """Outcome of one round's aggregation.

    Attributes:
        bundle: the encrypted sum ("sum" bundle), or None when no contribution was valid.
        accepted: bank ids whose updates are in the sum, in input order.
        rejected: one record per contribution left out, with its reason code and message.
    """

    bundle: bytes | None
    accepted: list[str] = field(default_factory=list)
    rejected: list[RejectedContribution] = field(default_factory=list)


def aggregate(
    bundles: Mapping[str, bytes] | Iterable[tuple[str, bytes]],
    *,
    key: CkksKey,
    expected: ExpectedHeader,
) -> AggregateResult:
    """Sum the valid bank updates of one round on ciphertexts; reject the others by name and reason.

    Every chunk of a contribution is hash-checked, deserialized and metadata-checked before any of
    it is added, so a bad contribution never touches the sum. Adds are in place (`add_`): `.copy()`
    of a ciphertext was measured ~400x slower than the add itself (~40 ms vs ~0.1 ms per chunk).

    Duplicates: the first contribution of a bank (input order) that passes every check counts; a
    later one from the same bank id, or one whose chunks are byte-identical to an accepted one's
    (a replayed ciphertext), is rejected as "duplicate".

    Args:
        bundles: sender bank id -> bundle bytes, or (bank id, bytes) pairs (pairs can repeat a
            bank id; a mapping cannot). The header's bank_id must equal the sender's id.
        key: the server's public context (`load_public_context`); a private one is refused so the
            server process never holds a decryption key.
        expected: key id, epoch, round, layout hash and element count of this round.

    Returns:
        The sum bundle (or None if nothing was valid), the accepted and the rejected banks.

    Raises:
        CryptoError: a private context, or `expected` naming another key id/epoch than `key`
            (a server misconfiguration, not a bank's fault).
    """
    if key.is_private():
        raise CryptoError(
            f"aggregate: context from {key.path} holds the secret key; the server must use the public context"
        )
    if (expected.key_id, expected.epoch) != (key.key_id, key.epoch):
        raise CryptoError(
            f"aggregate: expected key {expected.key_id} epoch {expected.epoch}, but the server's public context "
            f"{key.path} is key {key.key_id} epoch {key.epoch}"
        )
    items = list(bundles.items()) if isinstance(bundles, Mapping) else list(bundles)
    ctx = key.context
    ref = CiphertextRef.of(ctx)
    slots = key.params.slots

    acc: list[ts.CKKSVector] | None = None  # (n_chunks,) running sum, one ciphertext per chunk
    accepted: list[str] = []
    rejected: list[RejectedContribution] = []
    owner_of_digest: dict[str, str] = {}  # chunk SHA-256 -> accepted bank, to spot replays
    for sender, data in items:
        try:
            header, chunks = parse_bundle(data)
            _check_sender(sender, header, expected, slots, accepted, owner_of_digest)
            vecs = [load_chunk(ctx, header, i, chunk, ref) for i, chunk in enumerate(chunks)]
        except CryptoError as e:
            if e.reason is None:  # not a per-bank problem
                raise
            rejected.append(RejectedContribution(bank_id=str(sender), reason=e.reason, message=f"bank {sender!r}: {e}"))
            log.warning("round %d: rejected bank %r (%s): %s", expected.round, sender, e.reason, e)
            continue
        if acc is None:
            acc = vecs  # the first valid contribution becomes the accumulator; no copy
        else:
            for total, vec in zip(acc, vecs, strict=True):
                total.add_(vec)
        accepted.append(sender)
        owner_of_digest.update(dict.fromkeys(header.chunk_sha256, sender))

    log.info(
        "round %d: aggregated %d bank(s), rejected %d%s",
        expected.round,
        len(accepted),
        len(rejected),
        "" if not rejected else " (" + ", ".join(f"{r.bank_id}: {r.reason}" for r in rejected) + ")",
    )
    if acc is None:
        return AggregateResult(bundle=None, accepted=accepted, rejected=rejected)
    out_chunks = [vec.serialize() for vec in acc]
    header = BundleHeader(
        kind="sum",
        key_id=expected.key_id,
        epoch=expected.epoch,
        round=expected.round,
        n_elements=expected.n_elements,
        n_chunks=len(out_chunks),
        slots_per_chunk=slots,
        layout_hash=expected.layout_hash,
        bank_id=None,
        contributors=tuple(accepted),
        **chunk_index(out_chunks),
    )
    return AggregateResult(bundle=pack_bundle(header, out_chunks), accepted=accepted, rejected=rejected)


def _check_sender(
    sender: str,
    header: BundleHeader,
    expected: ExpectedHeader,
    slots: int,
    accepted: list[str],
    owner_of_digest: dict[str, str],
) -> None:
    """Header-level checks of one contribution; raises CryptoError with a reason code."""
    if header.kind != "update":
        raise CryptoError(f"bundle kind expected 'update', got {header.kind!r}", reason="kind")
    if header.bank_id != sender:
        raise CryptoError(
            f"bundle header names bank {header.bank_id!r}, received from bank {sender!r}", reason="bank_id"
        )
    check_header(header, expected, slots=slots)
    if sender in accepted:
        raise CryptoError("a contribution from this bank was already accepted this round", reason="duplicate")
    for i, digest in enumerate(header.chunk_sha256):
        if digest in owner_of_digest:
            raise CryptoError(
                f"chunk {i} is byte-identical to a chunk of bank {owner_of_digest[digest]!r}'s contribution "
                f"(replayed ciphertext)",
                reason="duplicate",
            )
