"""Accountable rounds (issue 25, item 4), in process: a poisoner named, a fake quarantine refused.

bank2 sends a valid masked input of 1e6 x its update; the honest banks would reject the aggregate.
Each honest bank checks the quarantine against the signed evidence (the sum recomputed with its own
BFV key must be the server's aggregate and must fail its check) and reveals its round mask key;
anyone with the BFV key then opens every contribution and names bank2 with its signed receipt,
even though bank2 revealed nothing. A quarantine whose recomputed sum passes the check, or whose
aggregate is not the sum of the signed inputs, gets nothing revealed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from secagg_helpers import JOB, make_updates, run_round, start_round

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.secagg.accountability import check_reveal, contributions, name_poisoners, verify_evidence
from fedmoe.crypto.secagg.bfv import encrypt_residues
from fedmoe.crypto.secagg.bfv_secret import decrypt_residues
from fedmoe.crypto.secagg.messages import RoundReveal
from fedmoe.crypto.secagg.params import dequantize, quantize
from fedmoe.crypto.secagg.primitives import new_x25519, x25519_public

N = 500
BOUND = 1.0
FACTOR = 1e6


def rejects(values: np.ndarray) -> str | None:
    """The banks' rule in these tests: every coordinate of a mean (or of one update) within BOUND."""
    peak = float(np.abs(values).max())
    return f"largest |coordinate| {peak:.3g} above the bound {BOUND}" if peak > BOUND else None


def _round(identities, bfv_public, *, poison: bool, n_banks: int = 4):
    ids, pins = identities
    r = start_round(ids[:n_banks], pins, bfv_public, N)
    updates, _ = make_updates(list(r.banks), N)
    weights = dict.fromkeys(r.banks, 1.0)
    sent = dict(updates)
    if poison:
        sent["bank2"] = updates["bank2"] * FACTOR
    run_round(r, sent, weights, bfv_public, skip_consent=True)
    return r, updates, pins


def _reveals(r, evidence, key, banks):
    return [r.banks[b].reveal(evidence, key, rejects, applied_round=0, reveals_left=1) for b in banks]


def test_a_poisoner_is_named_with_its_signed_receipt(identities, bfv_public, bfv_secret) -> None:
    r, updates, pins = _round(identities, bfv_public, poison=True)
    evidence = r.server.evidence()
    opened = verify_evidence(evidence, bfv_secret, pins)
    assert rejects(opened.mean())  # the honest banks' check rejects the aggregate: quarantined
    honest = ["bank0", "bank1", "bank3"]
    reveals = _reveals(r, evidence, bfv_secret, honest)  # bank2 reveals nothing
    accused, masked = name_poisoners(evidence, reveals, bfv_secret, pins, rejects)
    assert masked == [] and [a.bank_id for a in accused] == ["bank2"]
    [accusation] = accused
    assert accusation.receipt == next(x for x in r.aggregate.receipts if x.bank_id == "bank2")  # signed by bank2
    assert "above the bound" in accusation.reason and accusation.revealed_by == tuple(honest)
    # what revealing costs: that round's honest updates are open to whoever holds the BFV key (each
    # within the quantization step; each DP-protected at its bank)
    for bank, value in contributions(opened, reveals, pins).items():
        got = dequantize(value, r.setup.params)[:-1]
        want = updates[bank] * (FACTOR if bank == "bank2" else 1.0)
        assert np.abs(got - want).max() <= 0.5 / r.setup.params.scale + 1e-6 * abs(want).max(), bank
    # a reveal opens the round's mask key only: it matches the advertised key, nothing else is in it
    assert {f.name for f in dataclasses.fields(RoundReveal)} == {
        "bank_id", "job_id", "round", "evidence_sha256", "mask_sk", "signature"
    }  # fmt: skip
    for reveal in reveals:
        check_reveal(reveal, opened, pins)
        assert x25519_public(reveal.mask_sk) == r.banks[reveal.bank_id].advertisement.mask_pk


def test_with_too_few_reveals_the_poisoner_stays_masked_not_misnamed(identities, bfv_public, bfv_secret) -> None:
    """Only bank0 reveals: bank0 is opened (and within bound), the others stay masked, nobody is named."""
    r, _, pins = _round(identities, bfv_public, poison=True)
    evidence = r.server.evidence()
    accused, masked = name_poisoners(evidence, _reveals(r, evidence, bfv_secret, ["bank0"]), bfv_secret, pins, rejects)
    assert accused == [] and masked == ["bank1", "bank2", "bank3"]


def test_a_fake_quarantine_is_refused_and_nothing_revealed(identities, bfv_public, bfv_secret) -> None:
    """Nobody poisoned: the sum recomputed from the signed inputs passes the bank's check."""
    r, _, pins = _round(identities, bfv_public, poison=False)
    with pytest.raises(CryptoError, match="fake quarantine") as e:
        r.banks["bank0"].reveal(r.server.evidence(), bfv_secret, rejects, applied_round=0, reveals_left=1)
    assert e.value.reason == "inconsistent"


def test_a_server_that_unmasked_wrongly_is_blamed_not_the_banks(identities, bfv_public, bfv_secret) -> None:
    """The server sends an 'aggregate' that is not the sum of the signed inputs (here: one whose values
    are out of bound, which the banks would reject): the bank recomputes the sum and refuses."""
    r, _, pins = _round(identities, bfv_public, poison=False)
    evidence = r.server.evidence()
    _, honest_sum = decrypt_residues(evidence.aggregate.bundle, bfv_secret)
    forged_values = quantize(np.full(N, 5.0, np.float32), 4.0, r.setup.params)
    forged = encrypt_residues(forged_values, bfv_public, kind="sum", job_id=JOB, round=r.setup.round, bank_id=None)
    lie = dataclasses.replace(evidence, aggregate=dataclasses.replace(evidence.aggregate, bundle=forged))
    with pytest.raises(CryptoError, match="fault is the server's"):
        r.banks["bank0"].reveal(lie, bfv_secret, rejects, applied_round=0, reveals_left=1)
    assert not np.array_equal(honest_sum, forged_values)


@pytest.mark.parametrize("tamper", ["input bundle", "missing unmask reply", "foreign receipt"])
def test_evidence_that_does_not_hold_together_is_refused(tamper, identities, bfv_public, bfv_secret) -> None:
    r, _, pins = _round(identities, bfv_public, poison=True)
    evidence = r.server.evidence()
    if tamper == "input bundle":
        inputs = list(evidence.inputs)
        inputs[1] = dataclasses.replace(inputs[1], bundle=inputs[2].bundle)
        evidence = dataclasses.replace(evidence, inputs=tuple(inputs))
    elif tamper == "missing unmask reply":
        evidence = dataclasses.replace(evidence, unmask=evidence.unmask[:1])
    else:
        other, _, _ = _round(identities, bfv_public, poison=True)
        evidence = dataclasses.replace(evidence, inputs=other.server.evidence().inputs)
    with pytest.raises(CryptoError):
        r.banks["bank0"].reveal(evidence, bfv_secret, rejects, applied_round=0, reveals_left=1)


def test_reveals_are_bounded_by_the_banks_rules(identities, bfv_public, bfv_secret) -> None:
    """Never for a round the bank applied, never past its policy's per-job limit, never for another
    round's evidence; and a reveal that does not open the advertised key is refused by everyone."""
    r, _, pins = _round(identities, bfv_public, poison=True)
    evidence = r.server.evidence()
    bank = r.banks["bank0"]
    with pytest.raises(CryptoError, match="applied"):
        bank.reveal(evidence, bfv_secret, rejects, applied_round=1, reveals_left=1)
    with pytest.raises(CryptoError, match="no more reveals"):
        bank.reveal(evidence, bfv_secret, rejects, applied_round=0, reveals_left=0)
    other, _, _ = _round(identities, bfv_public, poison=True)
    with pytest.raises(CryptoError) as e:
        bank.reveal(other.server.evidence(), bfv_secret, rejects, applied_round=0, reveals_left=1)
    assert e.value.reason in ("replay", "inconsistent")
    opened = verify_evidence(evidence, bfv_secret, pins)
    good = bank.reveal(evidence, bfv_secret, rejects, applied_round=0, reveals_left=1)
    wrong_key = RoundReveal.signed(
        identities[0][0], **{k: getattr(good, k) for k in ("bank_id", "job_id", "round", "evidence_sha256")},
        mask_sk=new_x25519()[0],
    )  # fmt: skip
    with pytest.raises(CryptoError) as e:
        check_reveal(wrong_key, opened, pins)
    assert e.value.reason == "commitment"
    not_its_own = dataclasses.replace(good, bank_id="bank1")
    with pytest.raises(CryptoError) as e:
        check_reveal(not_its_own, opened, pins)
    assert e.value.reason == "signature"
