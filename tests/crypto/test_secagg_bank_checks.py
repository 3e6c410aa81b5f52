"""What a bank checks before it uses anything of a round (issue 25, items 2 and 3).

Keys that cannot hurt others: an advertised X25519 key that is not a full-order point of Curve25519
is refused at advertisement and its advertiser blamed (excluded by the server, complained about by
the banks), never its victims. On the starting code a low-order mask key made every honest bank's
masked input raise (after it had trained), and a low-order share key every honest bank's share_keys.

The bank owns its floor and its key: a setup below its own floor of contributors, or one naming
another BFV key or other parameters, is refused before any key is drawn.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from secagg_helpers import make_updates, run_round, start_round, weighted_mean

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.secagg.bank import BankSecAgg, open_aggregate
from fedmoe.crypto.secagg.messages import KeyAdvertisement, MaskedInputRequest, ShareKeysRequest, UnmaskRequest
from fedmoe.crypto.secagg.params import SecAggParams
from fedmoe.crypto.secagg.primitives import new_x25519
from fedmoe.crypto.secagg.server import ServerSecAgg

N = 300
P = 2**255 - 19
ORDER_8 = 325606250916557431795983626356110631294008115727848805560023387167927233504
BAD_POINTS = {
    "zero (order 1/2)": 0,
    "one (order 4, twist)": 1,
    "p - 1 (order 4)": P - 1,
    "order 8": ORDER_8,
    "order 8, other": 39382357235489614581723060781553021112529911719440698176882885853963445705823,
    "p + 1 (non-canonical 1)": P + 1,
    "top bit set": 2**255 + 9,
}


def _key(u: int) -> bytes:
    return u.to_bytes(32, "little")


@pytest.mark.parametrize("name", sorted(BAD_POINTS))
def test_invalid_x25519_points_are_refused(name) -> None:
    from fedmoe.crypto.secagg.primitives import check_x25519_public

    with pytest.raises(CryptoError) as e:
        check_x25519_public(_key(BAD_POINTS[name]), what="test")
    assert e.value.reason == "weak_key"


def test_honest_keys_pass_and_random_bytes_mostly_do_not() -> None:
    from fedmoe.crypto.secagg.primitives import check_x25519_public

    for _ in range(200):
        check_x25519_public(new_x25519()[1], what="honest")
    refused = 0
    for _ in range(200):  # about half of all u are on the twist, half have the top bit set
        try:
            check_x25519_public(os.urandom(32), what="random")
        except CryptoError:
            refused += 1
    assert 100 < refused < 200


def _hostile(identity, adv: KeyAdvertisement, field: str, u: int) -> KeyAdvertisement:
    """The advertisement re-signed by its own bank with one key replaced: a valid signature."""
    fields = {f.name: getattr(adv, f.name) for f in dataclasses.fields(adv) if f.name != "signature"}
    fields[field] = _key(u)
    return KeyAdvertisement.signed(identity, **fields)


@pytest.mark.parametrize("field", ["mask_pk", "share_pk"])
@pytest.mark.parametrize("point", ["order 8", "zero (order 1/2)", "one (order 4, twist)"])
def test_a_low_order_key_excludes_its_advertiser_and_the_round_goes_on(
    field, point, identities, bfv_public, bfv_secret
) -> None:
    """The issue's denial of service: bank3 advertises a low-order key (correctly signed). The
    server excludes bank3 at advertisement (weak_key) and the other three banks aggregate."""
    ids, pins = identities
    r = start_round(ids[:4], pins, bfv_public, N)
    banks = list(r.banks)
    updates, weights = make_updates(banks, N)
    hostile = ids[3]

    def swap(replies):
        adv = KeyAdvertisement.from_bytes(replies["bank3"])
        return {**replies, "bank3": _hostile(hostile, adv, field, BAD_POINTS[point]).to_bytes()}

    agg = run_round(r, updates, weights, bfv_public, hooks={"advertise": swap})
    assert agg.contributors == ("bank0", "bank1", "bank2")
    [exclusion] = r.server.exclusions
    assert (exclusion.bank_id, exclusion.stage, exclusion.reason) == ("bank3", "advertise", "weak_key")
    mean, total = open_aggregate(agg, setup=r.setup, key=bfv_secret, pins=pins)
    assert total == sum(weights[b] for b in banks[:3])
    assert np.abs(mean - weighted_mean(updates, weights, banks[:3])).max() < 1e-6


@pytest.mark.parametrize("field", ["mask_pk", "share_pk"])
def test_a_server_that_relays_a_low_order_key_gets_the_advertiser_blamed(field, identities, bfv_public) -> None:
    """A malicious server forwards bank3's low-order key anyway: each honest bank complains about
    bank3 (weak_key), deals it no share, does not mask with it, and still masks its own input."""
    ids, pins = identities
    r = start_round(ids[:4], pins, bfv_public, N)
    updates, _ = make_updates(list(r.banks), N)
    ads = {b: bank.advertise(r.setup) for b, bank in r.banks.items()}
    ads["bank3"] = _hostile(ids[3], ads["bank3"], field, ORDER_8)
    request = ShareKeysRequest(setup=r.setup, advertisements=tuple(ads[b] for b in sorted(ads)))
    honest = ["bank0", "bank1", "bank2"]
    replies = {b: r.banks[b].share_keys(request) for b in honest}
    for b in honest:
        assert {s.recipient for s in replies[b].shares} == set(honest) - {b}  # none for bank3
        assert [(c.dealer, c.reason) for c in r.banks[b].complaints] == [("bank3", "weak_key")]
    senders = tuple(honest)
    for b in honest:
        shares = tuple(s for d in honest for s in replies[d].shares if s.recipient == b)
        req = MaskedInputRequest(job_id=r.setup.job_id, round=r.setup.round, senders=senders, shares=shares)
        out = r.banks[b].masked_input(req, updates[b], 1.0, bfv_public)
        assert "bank3" not in out.receipt.masked_with and out.receipt.complaints[0].reason == "weak_key"


def test_masked_input_is_checked_before_training_without_changing_the_bank(identities, bfv_public) -> None:
    """`check_masked_input` runs every check and agreement of the stage and leaves the bank as it was."""
    ids, pins = identities
    r = start_round(ids[:4], pins, bfv_public, N)
    ads = {b: bank.advertise(r.setup) for b, bank in r.banks.items()}
    request = ShareKeysRequest(setup=r.setup, advertisements=tuple(ads[b] for b in sorted(ads)))
    replies = {b: bank.share_keys(request) for b, bank in r.banks.items()}
    bank = r.banks["bank0"]
    shares = tuple(s for d in replies for s in replies[d].shares if s.recipient == "bank0" and d != "bank1")
    req = MaskedInputRequest(job_id=r.setup.job_id, round=r.setup.round, senders=tuple(sorted(r.banks)), shares=shares)
    before = bank.state_dict()
    bank.check_masked_input(req, bfv_public)  # bank1's share is missing: a complaint, not a refusal
    assert bank.state_dict() == before and bank.stage == "shared"
    few = dataclasses.replace(req, senders=("bank0", "bank2"))
    with pytest.raises(CryptoError) as e:
        bank.check_masked_input(few, bfv_public)
    assert e.value.reason == "too_few" and bank.state_dict() == before
    out = bank.masked_input(req, np.zeros(N, np.float32), 1.0, bfv_public)
    assert out.receipt.masked_with == ("bank2", "bank3") and [c.dealer for c in out.receipt.complaints] == ["bank1"]


# ------------------------------------------------------------------------------------------------
# the bank's own floor and key


def test_a_bank_floor_is_never_two(identities) -> None:
    ids, pins = identities
    with pytest.raises(CryptoError, match="below 3"):
        BankSecAgg(ids[0], pins, min_banks=2)


def test_a_setup_below_the_banks_own_floor_is_refused(identities, bfv_public) -> None:
    """The server writes the job's min-banks; the bank's own floor decides (issue 25 (b))."""
    ids, pins = identities
    setup = ServerSecAgg.make_setup(
        job_id="j", round=1, participants=[i.bank_id for i in ids[:3]], n_elements=N, key=bfv_public, min_banks=2
    )
    assert BankSecAgg(ids[0], pins).advertise(setup, bfv_public)  # floor 3: three participants are fine
    with pytest.raises(CryptoError, match="floor of 4") as e:
        BankSecAgg(ids[0], pins, min_banks=4).advertise(setup, bfv_public)
    assert e.value.reason == "inconsistent"


def test_views_and_aggregates_below_the_banks_floor_are_refused(identities, bfv_public, bfv_secret) -> None:
    """A setup with min_banks 2 and four participants: a bank with floor 4 signs no view of three
    survivors and opens no aggregate of three contributors."""
    ids, pins = identities
    r = start_round(ids[:4], pins, bfv_public, N, min_banks=2)
    r.banks = {b: dataclasses.replace(bank, min_banks=4) if b == "bank0" else bank for b, bank in r.banks.items()}
    updates, weights = make_updates(list(r.banks), N)
    adv = {b: bank.advertise(r.setup) for b, bank in r.banks.items()}
    reqs = r.server.receive_advertisements(adv)
    reqs = r.server.receive_shares({b: r.banks[b].share_keys(q) for b, q in reqs.items()})
    inputs = {b: r.banks[b].masked_input(q, updates[b], weights[b], bfv_public) for b, q in reqs.items()}
    request = r.server.receive_masked_inputs(inputs)["bank0"]
    three = UnmaskRequest(
        job_id=request.job_id,
        round=request.round,
        survivors=("bank0", "bank1", "bank2"),
        dropped=("bank3",),
        receipts=request.receipts[:3],
    )
    with pytest.raises(CryptoError) as e:
        r.banks["bank0"].consent(three)
    assert e.value.reason == "too_few" and "rule V4" in str(e.value)
    assert r.banks["bank1"].consent(three)  # floor 3 (the default)
    r2 = start_round(ids[:4], pins, bfv_public, N, min_banks=2, round=2)
    agg = run_round(r2, updates, weights, bfv_public, drop_before_input=("bank3",))
    assert len(agg.contributors) == 3
    open_aggregate(agg, setup=r2.setup, key=bfv_secret, pins=pins, min_banks=3)
    with pytest.raises(CryptoError) as e:
        open_aggregate(agg, setup=r2.setup, key=bfv_secret, pins=pins, min_banks=4)
    assert e.value.reason == "too_few"


@pytest.mark.parametrize("what", ["key id", "parameters"])
def test_a_setup_with_another_bfv_key_or_parameters_is_refused(what, identities, bfv_public) -> None:
    ids, pins = identities
    setup = ServerSecAgg.make_setup(
        job_id="j", round=1, participants=[i.bank_id for i in ids[:4]], n_elements=N, key=bfv_public
    )
    if what == "key id":
        setup = dataclasses.replace(setup, bfv_key_id="0" * 64)
    else:
        setup = dataclasses.replace(setup, params=SecAggParams(scale_bits=18))
    bank = BankSecAgg(ids[0], pins)
    with pytest.raises(CryptoError) as e:
        bank.advertise(setup, bfv_public)
    assert e.value.reason == "key_id" and bank.stage == "new"
