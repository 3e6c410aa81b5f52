"""Rules both sides of secure aggregation apply: setup policy, signature checks, mask derivation.

Public-side code only (no BFV secret key, no decryption): imported by `fedmoe.crypto.secagg.bank` and
`fedmoe.crypto.secagg.server` alike, so both derive the same masks and enforce the same policy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import ConsortiumPins
from fedmoe.crypto.secagg.messages import KeyAdvertisement, Receipt, RoundSetup, self_mask_commitment
from fedmoe.crypto.secagg.params import add_mod, min_secure_threshold, neighbourhood, sub_mod
from fedmoe.crypto.secagg.primitives import (
    KEY_BYTES,
    check_x25519_public,
    derive_key,
    prg_mod,
    shamir_combine,
    x25519_public,
)


def check_setup(setup: RoundSetup, bank_id: str, pins: ConsortiumPins, *, min_banks: int, colluding: int) -> int:
    """A bank's (or the server's) policy check of a round setup; returns the bank's holder count.

    Raises:
        CryptoError: reason "inconsistent" naming the field that breaks the policy.
    """

    def bad(msg: str) -> CryptoError:
        return CryptoError(f"round setup (job {setup.job_id!r} round {setup.round}): {msg}", reason="inconsistent")

    ids = setup.participants
    if not setup.job_id or setup.round < 0:
        raise bad("job id must be non-empty and round >= 0")
    if list(ids) != sorted(set(ids)):
        raise bad(f"participants must be sorted and distinct, got {list(ids)}")
    if bank_id not in ids:
        raise bad(f"bank {bank_id!r} is not among the participants {list(ids)}")
    unknown = [b for b in ids if b not in pins]
    if unknown:
        raise bad(f"participants {unknown} are not pinned consortium members")
    if len(ids) > setup.params.max_banks:
        raise bad(f"{len(ids)} participants exceed params.max_banks {setup.params.max_banks}")
    if len(ids) < min_banks:
        raise bad(f"{len(ids)} participants, below this bank's floor of {min_banks} contributors (its 'min-banks')")
    if setup.min_banks < 2:
        raise bad(f"min_banks expected >= 2, got {setup.min_banks}")
    if setup.n_elements < 1:
        raise bad(f"n_elements must be >= 1, got {setup.n_elements}")
    holders = len(neighbourhood(bank_id, ids, job_id=setup.job_id, round=setup.round, k=setup.neighbours_k)) + 1
    floor = min_secure_threshold(holders, colluding)
    if not floor <= setup.threshold <= holders:
        raise bad(
            f"threshold {setup.threshold} is outside [{floor}, {holders}] for {holders} share holders: below "
            f"{floor}, the server and {colluding} bank(s) could recover both masks of a bank"
        )
    return holders


def check_key(setup: RoundSetup, key: Any, bank_id: str, where: str) -> None:
    """The setup must name this bank's BFV key and its parameters (a BfvKey: key_id, params).

    Raises:
        CryptoError: reason "key_id".
    """
    if key.key_id != setup.bfv_key_id or key.params != setup.params:
        raise CryptoError(
            f"{where}(bank {bank_id!r}): the setup names BFV key {setup.bfv_key_id[:12]} with {setup.params}, this "
            f"bank holds {key.key_id[:12]} with {key.params}",
            reason="key_id",
        )


def complete_graph(setup: RoundSetup) -> bool:
    """Everyone neighbours everyone: every bank's shares are held by all participants."""
    return setup.neighbours_k == 0 or setup.neighbours_k >= len(setup.participants) - 1


def consent_quorum(setup: RoundSetup, colluding: int = 1) -> int:
    """Consents on one unmask view needed before a share is released (in a complete graph, a view
    with nobody dropped needs none: it asks only for self-mask shares, BankSecAgg.unmask).

    Two different views each with q signatures need 2(q - c) honest signers out of n - c (honest
    banks sign one view), impossible when q > (n + c) / 2. With everyone neighbouring everyone this
    is the threshold t itself; with k-regular neighbourhoods it can be larger than t.
    """
    return max(setup.threshold, min_secure_threshold(len(setup.participants), colluding))


def pair_context(setup_job: str, round: int, a: str, b: str) -> dict[str, Any]:
    lo, hi = sorted((a, b))
    return {"job_id": setup_job, "round": round, "pair": [lo, hi]}


def share_ad(job_id: str, round: int, dealer: str, recipient: str) -> dict[str, Any]:
    return {"type": "secagg/share-ct", "job_id": job_id, "round": round, "dealer": dealer, "recipient": recipient}


def self_mask(seed: bytes, n: int, t: int, *, job_id: str, round: int, bank_id: str) -> np.ndarray:
    return prg_mod(seed, n, t, purpose="self-mask", context={"job_id": job_id, "round": round, "bank_id": bank_id})


def pair_mask(shared_seed: bytes, n: int, t: int) -> np.ndarray:
    return prg_mod(shared_seed, n, t, purpose="pair-mask-prg", context={})


def pair_seed(mask_sk: bytes, peer_mask_pk: bytes, *, job_id: str, round: int, a: str, b: str) -> bytes:
    return derive_key(mask_sk, peer_mask_pk, purpose="pair-mask", context=pair_context(job_id, round, a, b))


def verify_advertisement(adv: KeyAdvertisement, setup: RoundSetup, pins: ConsortiumPins) -> None:
    """Signature under the pinned key, bound to this job, round and setup; both keys valid X25519 points.

    Raises:
        CryptoError: reason "unknown_bank", "signature", "replay", "inconsistent", "malformed" or
            "weak_key" (a low-order, twist or non-canonical key: the advertiser is blamed).
    """
    if adv.bank_id not in setup.participants:
        raise CryptoError(f"advertisement from {adv.bank_id!r}, not a participant", reason="unknown_bank")
    pins.verify(adv.bank_id, adv.signed_bytes(), adv.signature)
    if (adv.job_id, adv.round) != (setup.job_id, setup.round):
        raise CryptoError(
            f"advertisement of {adv.bank_id!r} is for job {adv.job_id!r} round {adv.round}, not "
            f"{setup.job_id!r} round {setup.round} (replayed)",
            reason="replay",
        )
    if adv.setup_digest != setup.digest():
        raise CryptoError(f"advertisement of {adv.bank_id!r} signs another round setup", reason="inconsistent")
    if len(adv.share_pk) != KEY_BYTES or len(adv.mask_pk) != KEY_BYTES or len(adv.self_mask_commitment) != 32:
        raise CryptoError(f"advertisement of {adv.bank_id!r}: key sizes", reason="malformed")
    check_x25519_public(adv.share_pk, what=f"advertisement of {adv.bank_id!r} (share key)")
    check_x25519_public(adv.mask_pk, what=f"advertisement of {adv.bank_id!r} (mask key)")


def verify_receipt(r: Receipt, setup: RoundSetup, pins: ConsortiumPins) -> None:
    """Signature under the pinned key and bound to this job and round.

    Raises:
        CryptoError: reason "unknown_bank", "signature" or "replay".
    """
    if r.bank_id not in setup.participants:
        raise CryptoError(f"receipt of {r.bank_id!r}, not a participant", reason="unknown_bank")
    pins.verify(r.bank_id, r.signed_bytes(), r.signature)
    if (r.job_id, r.round) != (setup.job_id, setup.round):
        raise CryptoError(f"receipt of {r.bank_id!r} is for another job/round", reason="replay")


def reconstruct(
    setup: RoundSetup, dealer: str, kind: str, shares: dict[int, bytes], advertisement: KeyAdvertisement
) -> bytes:
    """The secret `dealer` shared (its self-mask seed or mask key), from t shares, checked against its
    signed advertisement (seed commitment, mask public key).

    Raises:
        CryptoError: reason "too_few" (fewer than t shares) or "commitment" (the dealer dealt
            inconsistent shares: the secret does not match what it advertised).
    """
    if len(shares) < setup.threshold:
        raise CryptoError(
            f"{kind} of {dealer!r}: {len(shares)} valid shares, threshold {setup.threshold}", reason="too_few"
        )
    secret = shamir_combine(dict(sorted(shares.items())[: setup.threshold]))
    if kind == "self_mask":
        ok = advertisement.self_mask_commitment == self_mask_commitment(
            job_id=setup.job_id, round=setup.round, bank_id=dealer, seed=secret
        )
    else:
        ok = x25519_public(secret) == advertisement.mask_pk
    if not ok:
        raise CryptoError(
            f"the {kind} reconstructed for {dealer!r} does not match its advertisement", reason="commitment"
        )
    return secret


def residual_masks(
    setup: RoundSetup,
    survivors: tuple[str, ...],
    masked_with: dict[str, tuple[str, ...]],
    advertisements: dict[str, KeyAdvertisement],
    self_seeds: dict[str, bytes],
    mask_keys: dict[str, bytes],
) -> np.ndarray:
    """What the sum of the survivors' masked inputs holds beyond their plain sum: their self masks and
    their pairwise masks with dropped banks (pairs of survivors cancel). `masked_with`: each
    survivor's signed receipt; `mask_keys`: the dropped banks' reconstructed mask keys.

    Returns:
        uint64 residues modulo t, shape (n_elements + 1,).
    """
    t, n = setup.params.plain_modulus, setup.n_elements + 1
    residual = np.zeros(n, dtype=np.uint64)
    for s in survivors:
        residual = add_mod(
            residual, self_mask(self_seeds[s], n, t, job_id=setup.job_id, round=setup.round, bank_id=s), t
        )
    for dropped, key in mask_keys.items():
        for s in survivors:
            if dropped not in masked_with[s]:
                continue
            seed = pair_seed(key, advertisements[s].mask_pk, job_id=setup.job_id, round=setup.round, a=s, b=dropped)
            m = pair_mask(seed, n, t)
            # In s's input the pair's mask went in with + if s < dropped, else with -.
            residual = add_mod(residual, m, t) if s < dropped else sub_mod(residual, m, t)
    return residual
