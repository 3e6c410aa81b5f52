"""Accountable rounds: name the bank whose masked input put a quarantined sum out of bound.

Secure aggregation hides each input, so when the honest banks reject a round's aggregate (out of
bound) nobody can say whose input did it. This module lets them, at a stated price:

1. The server hands out the quarantined round's `QuarantineEvidence` (`ServerSecAgg.evidence()`):
   the setup, the signed advertisements, the survivors' masked inputs with their signed receipts,
   the unmask replies (every share signed by its dealer) and the aggregate.
2. A bank whose policy allows it (`reveal-on-quarantine`) calls `BankSecAgg.reveal(...)`:
   `verify_quarantine` first recomputes the unmasked sum from that evidence with the bank's own BFV
   key and refuses, revealing nothing, unless the sum is exactly the aggregate the server sent
   (else the server is at fault) and the bank's own check rejects it (else the quarantine is
   fake). Only then does it reveal that round's mask secret key (`RoundReveal`): round keys only,
   never its identity key or another round's. Its self-mask seed is not revealed: the server
   reconstructed every survivor's seed to unmask, and the evidence holds the shares.
3. Anyone with the BFV key (each bank, the auditor) runs `name_poisoners(...)`: each survivor's
   contribution, opened with its own revealed key or its partners' (one survivor left unopened is
   the sum minus the others), checked by the caller's per-contribution rule; each one out of bound
   is named in an `Accusation` carrying its signed receipt, which proves who sent that input.

What revealing costs: that round's individual updates become visible to whoever holds the BFV key
(each is DP-protected by its bank's own noise, and its epsilon is already on that bank's ledger).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import ConsortiumPins, Identity
from fedmoe.crypto.secagg import messages
from fedmoe.crypto.secagg.bfv import BfvKey
from fedmoe.crypto.secagg.bfv_secret import decrypt_residues
from fedmoe.crypto.secagg.common import (
    pair_mask,
    pair_seed,
    reconstruct,
    residual_masks,
    self_mask,
    verify_advertisement,
    verify_receipt,
)
from fedmoe.crypto.secagg.params import add_mod, dequantize, sub_mod
from fedmoe.crypto.secagg.primitives import x25519_public

# A check of a mean update (an aggregate's) or of one contribution: None = fine, else why not.
Check = Callable[[np.ndarray], "str | None"]


def evidence_digest(evidence: messages.QuarantineEvidence) -> bytes:
    """What a reveal names: the setup, every survivor's signed receipt, the aggregate's bytes."""
    return evidence.digest()


@dataclass
class Opened:
    """A quarantined round recomputed from its evidence (`verify_evidence`)."""

    evidence: messages.QuarantineEvidence
    advertisements: dict[str, messages.KeyAdvertisement]
    receipts: dict[str, messages.Receipt]
    residues: dict[str, np.ndarray]  # each survivor's decrypted masked input
    self_seeds: dict[str, bytes]
    mask_keys: dict[str, bytes]  # dropped banks' (reconstructed to unmask)
    total: np.ndarray  # the unmasked sum, residues modulo t

    @property
    def setup(self) -> messages.RoundSetup:
        return self.evidence.setup

    def mean(self) -> np.ndarray:
        values = dequantize(self.total, self.setup.params)
        return (values[:-1] / values[-1]).astype(np.float32)


def verify_evidence(evidence: messages.QuarantineEvidence, key: BfvKey, pins: ConsortiumPins) -> Opened:
    """Recompute the round's unmasked sum from the signed evidence and check it is the aggregate.

    Raises:
        CryptoError: a signature, hash, share or commitment that fails, an input or share missing,
            or "inconsistent" when the server's aggregate is not the sum of the signed inputs.
    """
    setup, aggregate = evidence.setup, evidence.aggregate
    where = f"quarantine evidence (job {setup.job_id!r} round {setup.round})"
    if (aggregate.job_id, aggregate.round) != (setup.job_id, setup.round):
        raise CryptoError(f"{where}: the aggregate is of another job or round", reason="replay")
    adverts: dict[str, messages.KeyAdvertisement] = {}
    for adv in evidence.advertisements:
        verify_advertisement(adv, setup, pins)
        if adverts.setdefault(adv.bank_id, adv) != adv:
            raise CryptoError(f"{where}: two advertisements of {adv.bank_id!r}", reason="duplicate")
    survivors = aggregate.contributors
    receipts = {m.receipt.bank_id: m.receipt for m in evidence.inputs}
    if tuple(sorted(receipts)) != survivors or len(evidence.inputs) != len(survivors):
        raise CryptoError(f"{where}: exactly one masked input per contributor expected", reason="inconsistent")
    if {r.signature for r in aggregate.receipts} != {r.signature for r in receipts.values()}:
        raise CryptoError(f"{where}: the inputs' receipts are not the aggregate's", reason="inconsistent")
    residues = {}
    for m in evidence.inputs:
        r = m.receipt
        verify_receipt(r, setup, pins)
        if r.bank_id not in adverts:
            raise CryptoError(f"{where}: no advertisement of contributor {r.bank_id!r}", reason="inconsistent")
        if hashlib.sha256(m.bundle).digest() != r.bundle_sha256:
            raise CryptoError(f"{where}: the input of {r.bank_id!r} is not the one it signed", reason="hash")
        header, residues[r.bank_id] = decrypt_residues(m.bundle, key)
        got = (header.kind, header.job_id, header.round, header.bank_id, header.n_values)
        if got != ("masked_input", setup.job_id, setup.round, r.bank_id, setup.n_elements + 1):
            raise CryptoError(f"{where}: the input of {r.bank_id!r} has header {got}", reason="layout")

    shares: dict[tuple[str, str], dict[int, bytes]] = {}
    for reply in evidence.unmask:
        if reply.bank_id not in setup.participants:
            raise CryptoError(f"{where}: unmask reply of {reply.bank_id!r}", reason="unknown_bank")
        x = 1 + setup.participants.index(reply.bank_id)
        for s in reply.shares:
            payload = messages.share_signature_payload(
                job_id=setup.job_id, round=setup.round, dealer=s.dealer, holder=reply.bank_id, kind=s.kind, x=x, y=s.y
            )
            if s.holder != reply.bank_id or s.x != x:
                raise CryptoError(f"{where}: a share of {s.dealer!r} not held by {reply.bank_id!r}", reason="share")
            pins.verify(s.dealer, payload, s.dealer_signature)
            shares.setdefault((s.dealer, s.kind), {})[x] = s.y
    self_seeds = {
        b: reconstruct(setup, b, "self_mask", shares.get((b, "self_mask"), {}), adverts[b]) for b in survivors
    }
    dropped = {d for d, kind in shares if kind == "mask_key"}
    if dropped & set(survivors):
        raise CryptoError(
            f"{where}: mask keys of contributors {sorted(dropped & set(survivors))}", reason="inconsistent"
        )
    masked_with = {b: receipts[b].masked_with for b in survivors}
    needed = {p for b in survivors for p in masked_with[b] if p not in survivors}
    if not needed <= dropped:
        raise CryptoError(
            f"{where}: pairwise masks with {sorted(needed - dropped)} cannot be removed", reason="too_few"
        )
    mask_keys = {d: reconstruct(setup, d, "mask_key", shares[(d, "mask_key")], adverts[d]) for d in sorted(needed)}

    t = setup.params.plain_modulus
    total = residual_masks(setup, survivors, masked_with, adverts, self_seeds, mask_keys)
    total = (np.uint64(t) - total) % np.uint64(t)
    for b in survivors:
        total = add_mod(total, residues[b], t)
    header, sent = decrypt_residues(aggregate.bundle, key)
    if (header.kind, header.n_values) != ("sum", setup.n_elements + 1) or not np.array_equal(sent, total):
        raise CryptoError(
            f"{where}: the server's aggregate is not the sum of the signed inputs; the fault is the server's",
            reason="inconsistent",
        )
    return Opened(evidence, adverts, receipts, residues, self_seeds, mask_keys, total)


def verify_quarantine(
    evidence: messages.QuarantineEvidence, key: BfvKey, pins: ConsortiumPins, rejects: Check
) -> tuple[Opened, str]:
    """`verify_evidence`, then the bank's own check of the recomputed mean must reject it.

    Returns:
        (the opened round, the check's reason).

    Raises:
        CryptoError: as `verify_evidence`; reason "inconsistent" for a fake quarantine (the
            recomputed aggregate passes the bank's check).
    """
    opened = verify_evidence(evidence, key, pins)
    reason = rejects(opened.mean())
    if not reason:
        raise CryptoError(
            f"quarantine of round {evidence.setup.round}: the sum recomputed from the signed inputs passes this "
            f"bank's check; a fake quarantine, nothing revealed",
            reason="inconsistent",
        )
    return opened, reason


def check_reveal(reveal: messages.RoundReveal, opened: Opened, pins: ConsortiumPins) -> None:
    """A reveal must be signed by its bank, for this round and evidence, and open its advertised key."""
    setup = opened.setup
    pins.verify(reveal.bank_id, reveal.signed_bytes(), reveal.signature)
    if (reveal.job_id, reveal.round) != (setup.job_id, setup.round):
        raise CryptoError(f"reveal of {reveal.bank_id!r} is for another round", reason="replay")
    if reveal.evidence_sha256 != evidence_digest(opened.evidence):
        raise CryptoError(f"reveal of {reveal.bank_id!r} names other evidence", reason="inconsistent")
    adv = opened.advertisements.get(reveal.bank_id)
    if adv is None or x25519_public(reveal.mask_sk) != adv.mask_pk:
        raise CryptoError(f"reveal of {reveal.bank_id!r} does not open its advertised mask key", reason="commitment")


def contributions(
    opened: Opened, reveals: list[messages.RoundReveal], pins: ConsortiumPins
) -> dict[str, np.ndarray | None]:
    """Each survivor's contribution [w * delta..., w] (residues modulo t), None where it stays masked.

    A survivor's input opens when, for every bank it masked with, its own or that bank's mask key is
    known (revealed, or reconstructed because that bank dropped). One survivor left unopened is the
    sum minus all the others.
    """
    setup = opened.setup
    t, n = setup.params.plain_modulus, setup.n_elements + 1
    keys = dict(opened.mask_keys)
    for reveal in reveals:
        check_reveal(reveal, opened, pins)
        keys[reveal.bank_id] = reveal.mask_sk
    out: dict[str, np.ndarray | None] = {}
    for s, residues in opened.residues.items():
        value = sub_mod(
            residues, self_mask(opened.self_seeds[s], n, t, job_id=setup.job_id, round=setup.round, bank_id=s), t
        )
        for p in opened.receipts[s].masked_with:
            if s in keys:
                seed = pair_seed(
                    keys[s], opened.advertisements[p].mask_pk, job_id=setup.job_id, round=setup.round, a=s, b=p
                )
            elif p in keys:
                seed = pair_seed(
                    keys[p], opened.advertisements[s].mask_pk, job_id=setup.job_id, round=setup.round, a=p, b=s
                )
            else:
                value = None
                break
            m = pair_mask(seed, n, t)
            value = sub_mod(value, m, t) if s < p else add_mod(value, m, t)
        out[s] = value
    unopened = [s for s, v in out.items() if v is None]
    if len(unopened) == 1:
        rest = opened.total
        for v in out.values():
            if v is not None:
                rest = sub_mod(rest, v, t)
        out[unopened[0]] = rest
    return out


def name_poisoners(
    evidence: messages.QuarantineEvidence,
    reveals: list[messages.RoundReveal],
    key: BfvKey,
    pins: ConsortiumPins,
    rejects_one: Check,
) -> tuple[list[messages.Accusation], list[str]]:
    """The contributors whose own update `rejects_one` rejects, each with its signed receipt.

    Returns:
        (accusations, the survivors whose input stayed masked: too few reveals to open them).
    """
    opened = verify_evidence(evidence, key, pins)
    opened_by = tuple(sorted(r.bank_id for r in reveals))
    accused, masked = [], []
    for bank, value in sorted(contributions(opened, reveals, pins).items()):
        if value is None:
            masked.append(bank)
            continue
        values = dequantize(value, opened.setup.params)
        weight = values[-1]
        reason = (
            f"weight {weight:.6g} is not positive"
            if weight <= 0
            else rejects_one((values[:-1] / weight).astype(np.float32))
        )
        if reason:
            accused.append(
                messages.Accusation(
                    bank_id=bank,
                    round=opened.setup.round,
                    reason=reason,
                    receipt=opened.receipts[bank],
                    revealed_by=opened_by,
                )
            )
    return accused, masked


def verdict(
    identity: Identity, request: messages.AccuseRequest, key: BfvKey, pins: ConsortiumPins, rejects_one: Check
) -> messages.Verdict:
    """This bank's signed finding on a quarantined round (`name_poisoners` with its own BFV key)."""
    accused, masked = name_poisoners(request.evidence, list(request.reveals), key, pins, rejects_one)
    setup = request.evidence.setup
    return messages.Verdict.signed(
        identity,
        bank_id=identity.bank_id,
        job_id=setup.job_id,
        round=setup.round,
        evidence_sha256=request.evidence.digest(),
        accused=tuple(accused),
        masked=tuple(masked),
    )
