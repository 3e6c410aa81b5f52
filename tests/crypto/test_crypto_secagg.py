"""Secure aggregation end to end, in process: sums, dropouts, aborts, bad input, the coalition attack."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from secagg_helpers import (
    JOB,
    make_updates,
    run_round,
    split_views,
    start_round,
    through_masked_input,
    weighted_mean,
)

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.secagg.bank import BankSecAgg, open_aggregate
from fedmoe.crypto.secagg.bfv_secret import decrypt_residues
from fedmoe.crypto.secagg.common import pair_mask, pair_seed, self_mask
from fedmoe.crypto.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    MaskedInput,
    ShareKeysReply,
    UnmaskConsent,
    UnmaskOrder,
    UnmaskReply,
)
from fedmoe.crypto.secagg.params import default_threshold, dequantize, min_secure_threshold, sub_mod
from fedmoe.crypto.secagg.primitives import shamir_combine
from fedmoe.crypto.secagg.server import ServerSecAgg

N = 3 * 4096 + 11  # 4 chunks (N + 1 values), the last one partly filled


def _bound(weights: dict, banks: list[str], scale: float) -> float:
    """Quantization bound of the weighted mean: each bank rounds w * delta to 1/scale."""
    return len(banks) * 0.5 / scale / sum(weights[b] for b in banks) + 1e-9  # + float32 cast of ~1e-3 values


def _check_sum(r, updates, weights, included, bfv_secret, pins) -> None:
    mean, total = open_aggregate(r.aggregate, setup=r.setup, key=bfv_secret, pins=pins)
    assert r.aggregate.contributors == tuple(sorted(included))
    assert total == sum(weights[b] for b in included)  # integer weights are exact in fixed point
    err = np.abs(mean - weighted_mean(updates, weights, included)).max()
    assert err <= _bound(weights, included, r.setup.params.scale), err


@pytest.mark.parametrize("unit_weights", [False, True])  # sample counts, or weight 1 per bank
def test_all_banks_give_the_weighted_mean(unit_weights, identities, bfv_public, bfv_secret) -> None:
    ids, pins = identities
    r = start_round(ids[:4], pins, bfv_public, N)
    banks = list(r.banks)
    updates, weights = make_updates(banks, N)
    if unit_weights:
        weights = dict.fromkeys(banks, 1.0)
    run_round(r, updates, weights, bfv_public)
    assert r.setup.threshold == 3 and r.server.exclusions == []
    _check_sum(r, updates, weights, banks, bfv_secret, pins)


@pytest.mark.parametrize(
    ("n_banks", "drops", "included"),
    [
        (4, {"drop_before_unmask": ("bank3",)}, "all"),  # sent masked input, then vanished
        (4, {"drop_before_input": ("bank3",)}, "bank3 out"),  # sent shares, no masked input
        (4, {"drop_before_shares": ("bank3",)}, "bank3 out"),  # advertised only
        (6, {"drop_before_input": ("bank4",), "drop_before_unmask": ("bank5",)}, "bank4 out"),
    ],
)
def test_dropouts_are_survived(n_banks, drops, included, identities, bfv_public, bfv_secret) -> None:
    ids, pins = identities
    r = start_round(ids[:n_banks], pins, bfv_public, N)
    banks = list(r.banks)
    updates, weights = make_updates(banks, N, seed=n_banks)
    run_round(r, updates, weights, bfv_public, **drops)
    keep = banks if included == "all" else [b for b in banks if b != included.split()[0]]
    _check_sum(r, updates, weights, keep, bfv_secret, pins)
    dropped = {b for names in drops.values() for b in names}
    assert {e.bank_id for e in r.server.exclusions} == dropped
    assert {e.reason for e in r.server.exclusions} == {"dropped"}


def test_fewer_than_t_survivors_aborts_cleanly(identities, bfv_public) -> None:
    ids, pins = identities
    r = start_round(ids[:4], pins, bfv_public, N)  # t = 3
    updates, weights = make_updates(list(r.banks), N)
    with pytest.raises(CryptoError) as e:
        run_round(r, updates, weights, bfv_public, drop_before_input=("bank2", "bank3"))
    assert e.value.reason == "too_few"
    assert "unmask_requests" not in r.seen  # nobody was asked for a share, nothing was summed
    assert r.aggregate is None
    with pytest.raises(CryptoError, match="stage"):  # the aborted round accepts nothing more
        r.server.receive_unmask({})


def test_too_few_unmask_replies_aborts(identities, bfv_public) -> None:
    ids, pins = identities
    r = start_round(ids[:4], pins, bfv_public, N)
    updates, weights = make_updates(list(r.banks), N)
    with pytest.raises(CryptoError) as e:
        run_round(r, updates, weights, bfv_public, drop_before_unmask=("bank2", "bank3"))
    assert e.value.reason == "too_few" and r.aggregate is None


def test_bank_refuses_unmask_with_fewer_than_t_survivors(identities, bfv_public) -> None:
    ids, pins = identities
    r = start_round(ids[:4], pins, bfv_public, N)  # t = 3
    updates, weights = make_updates(list(r.banks), N)
    honest = through_masked_input(r, updates, weights, bfv_public)["bank0"]
    # A server that claims only two banks survived wants bank0's shares of too small a sum.
    few = dataclasses.replace(
        honest,
        survivors=("bank0", "bank1"),
        dropped=("bank2", "bank3"),
        receipts=tuple(x for x in honest.receipts if x.bank_id in ("bank0", "bank1")),
    )
    with pytest.raises(CryptoError) as e:
        r.banks["bank0"].consent(few)
    assert e.value.reason == "too_few" and r.banks["bank0"].stage == "masked"


# ------------------------------------------------------------------------------------------------
# bad input: excluded by name, the round goes on while t remain


def _tamper(stage_replies: dict, bank: str, fn) -> dict:
    return {b: (fn(m) if b == bank else m) for b, m in stage_replies.items()}


def test_bad_advertisement_signature_is_excluded(identities, bfv_public, bfv_secret) -> None:
    ids, pins = identities
    r = start_round(ids[:5], pins, bfv_public, N)  # t = 4

    def forge(raw: bytes) -> bytes:  # the server (or the network) swaps in its own mask key
        adv = KeyAdvertisement.from_bytes(raw)
        return dataclasses.replace(adv, mask_pk=bytes(32 * [7])).to_bytes()

    updates, weights = make_updates(list(r.banks), N)
    run_round(r, updates, weights, bfv_public, hooks={"advertise": lambda m: _tamper(m, "bank4", forge)})
    assert [(e.bank_id, e.stage, e.reason) for e in r.server.exclusions] == [("bank4", "advertise", "signature")]
    _check_sum(r, updates, weights, ["bank0", "bank1", "bank2", "bank3"], bfv_secret, pins)


def test_replayed_advertisement_is_refused(identities, bfv_public, bfv_secret) -> None:
    ids, pins = identities
    old = start_round(ids[:5], pins, bfv_public, N, round=1)
    old_adv = BankSecAgg(ids[4], pins).advertise(old.setup).to_bytes()
    r = start_round(ids[:5], pins, bfv_public, N, round=2)
    updates, weights = make_updates(list(r.banks), N)
    run_round(r, updates, weights, bfv_public, hooks={"advertise": lambda m: _tamper(m, "bank4", lambda _: old_adv)})
    assert [(e.bank_id, e.reason) for e in r.server.exclusions] == [("bank4", "replay")]
    _check_sum(r, updates, weights, ["bank0", "bank1", "bank2", "bank3"], bfv_secret, pins)
    # A bank also refuses a replayed advertisement the server slips into its request.
    bank = BankSecAgg(ids[0], pins)
    bank.advertise(r.setup)
    with pytest.raises(CryptoError) as e:
        from fedmoe.crypto.secagg.common import verify_advertisement

        verify_advertisement(KeyAdvertisement.from_bytes(old_adv), r.setup, pins)
    assert e.value.reason == "replay"


def test_corrupted_share_excludes_its_dealer(identities, bfv_public, bfv_secret) -> None:
    ids, pins = identities
    r = start_round(ids[:6], pins, bfv_public, N)  # t = 4: bank4's mask key needs 4 of 5 holders

    def flip(raw: bytes) -> bytes:  # one share of bank4's, to bank0, altered in transit
        reply = ShareKeysReply.from_bytes(raw)
        shares = [
            dataclasses.replace(s, ciphertext=bytes([s.ciphertext[0] ^ 1]) + s.ciphertext[1:])
            if s.recipient == "bank0"
            else s
            for s in reply.shares
        ]
        return dataclasses.replace(reply, shares=tuple(shares)).to_bytes()

    updates, weights = make_updates(list(r.banks), N)
    run_round(r, updates, weights, bfv_public, hooks={"share_keys": lambda m: _tamper(m, "bank4", flip)})
    assert [(e.bank_id, e.stage, e.reason) for e in r.server.exclusions] == [("bank4", "masked_input", "share")]
    # bank4 sent masked input but is unmasked as dropped: its input is out, everyone else's is exact.
    _check_sum(r, updates, weights, ["bank0", "bank1", "bank2", "bank3", "bank5"], bfv_secret, pins)


def test_forged_revealed_share_is_excluded(identities, bfv_public, bfv_secret) -> None:
    ids, pins = identities
    r = start_round(ids[:5], pins, bfv_public, N)

    def forge(raw: bytes) -> bytes:
        reply = UnmaskReply.from_bytes(raw)
        s0 = reply.shares[0]
        bad = dataclasses.replace(s0, y=bytes(len(s0.y)))
        return dataclasses.replace(reply, shares=(bad, *reply.shares[1:])).to_bytes()

    updates, weights = make_updates(list(r.banks), N)
    run_round(r, updates, weights, bfv_public, hooks={"unmask": lambda m: _tamper(m, "bank2", forge)})
    assert [(e.bank_id, e.stage, e.reason) for e in r.server.exclusions] == [("bank2", "unmask", "share")]
    _check_sum(r, updates, weights, list(r.banks), bfv_secret, pins)  # bank2's input still counts


def test_inconsistent_dealer_fails_the_commitment(identities, bfv_public) -> None:
    ids, pins = identities
    r = start_round(ids[:4], pins, bfv_public, N)
    updates, weights = make_updates(list(r.banks), N)
    adv = {b: bank.advertise(r.setup).to_bytes() for b, bank in r.banks.items()}
    r.banks["bank1"].self_seed = bytes(32)  # deals shares of another seed than it committed to
    reqs = r.server.receive_advertisements(adv)
    reqs = r.server.receive_shares({b: r.banks[b].share_keys(q) for b, q in reqs.items()})
    reqs = r.server.receive_masked_inputs(
        {b: r.banks[b].masked_input(q, updates[b], weights[b], bfv_public) for b, q in reqs.items()}
    )
    orders = r.server.receive_consents({b: r.banks[b].consent(q) for b, q in reqs.items()})
    with pytest.raises(CryptoError) as e:
        r.server.receive_unmask({b: r.banks[b].unmask(q) for b, q in orders.items()})
    assert e.value.reason == "commitment" and "bank1" in str(e.value)
    assert [(x.bank_id, x.reason) for x in e.value.exclusions] == [("bank1", "commitment")]


def _consents(r, request, banks) -> tuple:
    return tuple(r.banks[b].consent(request) for b in banks)


def test_bank_never_releases_both_shares_of_a_peer(identities, bfv_public) -> None:
    ids, pins = identities
    r = start_round(ids[:5], pins, bfv_public, N)
    updates, weights = make_updates(list(r.banks), N)
    honest = through_masked_input(r, updates, weights, bfv_public)["bank0"]
    # A lying server claims bank4 dropped (to get its mask key) while also asking for its self mask.
    both = dataclasses.replace(honest, dropped=("bank4",))
    with pytest.raises(CryptoError, match="both") as e:
        r.banks["bank0"].consent(both)
    assert e.value.reason == "inconsistent" and r.banks["bank0"].stage == "masked"
    # bank0 signs the honest view; a second view (bank4 dropped after all) is refused ...
    claims_dropped = dataclasses.replace(
        honest,
        survivors=tuple(b for b in honest.survivors if b != "bank4"),
        dropped=("bank4",),
        receipts=tuple(x for x in honest.receipts if x.bank_id != "bank4"),
    )
    order = UnmaskOrder(request=honest, consents=_consents(r, honest, ["bank0", "bank1", "bank2", "bank3"]))
    with pytest.raises(CryptoError, match="second") as e:
        r.banks["bank0"].consent(claims_dropped)
    assert e.value.reason == "inconsistent"
    # ... and so is an order for it.
    for bad in (
        UnmaskOrder(request=claims_dropped, consents=()),
        UnmaskOrder(request=claims_dropped, consents=order.consents),
    ):
        with pytest.raises(CryptoError, match="rule CF|consented to") as e:
            r.banks["bank0"].unmask(bad)
    assert r.banks["bank0"].released == {}
    reply = r.banks["bank0"].unmask(order)
    assert r.banks["bank0"].released["bank4"] == "self_mask"
    assert r.banks["bank0"].unmask(order) == reply  # a retry gets the same shares


def test_split_view_attack_gets_no_quorum(identities, bfv_public) -> None:
    """The server tells bank0 that bank3 dropped (to collect bank3's mask key) and tells bank1..2 that
    bank3 survived (to collect its self mask). With bank2 colluding, neither view gets a quorum of
    honest consents large enough to unlock both (n = 5, t = quorum = 4)."""
    r, ids, honest, view_b = split_views(identities, bfv_public, N)
    # view A (bank3 survived): bank1, bank3, bank4 sign it, the colluder bank2 too -> 4
    sig_a = _consents(r, honest, ["bank1", "bank3", "bank4", "bank2"])
    # view B (bank3 dropped): bank0 and the colluder only -> 2 (bank1, 3, 4 already signed view A)
    colluder = UnmaskConsent.signed(ids[2], bank_id="bank2", job_id=JOB, round=1, view_sha256=view_b.view_sha256())
    sig_b = (r.banks["bank0"].consent(view_b), colluder)
    with pytest.raises(CryptoError):
        r.banks["bank1"].consent(view_b)
    with pytest.raises(CryptoError) as e:
        r.banks["bank0"].unmask(UnmaskOrder(request=view_b, consents=sig_b))
    assert e.value.reason == "too_few" and r.banks["bank0"].released == {}
    with pytest.raises(CryptoError) as e:  # consents on the other view do not count
        r.banks["bank0"].unmask(UnmaskOrder(request=view_b, consents=sig_b + sig_a))
    assert e.value.reason == "inconsistent" and r.banks["bank0"].released == {}
    assert r.banks["bank1"].unmask(UnmaskOrder(request=honest, consents=sig_a)).shares


def test_no_consent_stage_when_nobody_dropped(identities, bfv_public, bfv_secret) -> None:
    ids, pins = identities
    r = start_round(ids[:4], pins, bfv_public, N)
    banks = list(r.banks)
    updates, weights = make_updates(banks, N, seed=7)
    run_round(r, updates, weights, bfv_public, skip_consent=True, drop_before_unmask=("bank3",))
    assert "consistency" not in r.seen  # the order went out without consents
    _check_sum(r, updates, weights, banks, bfv_secret, pins)  # bank3's self mask rebuilt from 3 shares
    # once a bank dropped before its masked input, the server must collect consents
    r = start_round(ids[:4], pins, bfv_public, N)
    through_masked_input(r, updates, weights, bfv_public, skip=("bank3",))
    assert r.server.dropped == ("bank3",) and r.server.orders_without_consent() is None
    assert r.server.receive_consents({b: r.banks[b].consent(r.server.request) for b in ("bank0", "bank1", "bank2")})


def test_an_order_without_consents_is_the_banks_one_view(identities, bfv_public) -> None:
    """Without consents a bank unmasks only a view in which every stage-1 sender survived, and that
    view binds it like a signature: it releases no mask key of the round afterwards."""
    ids, pins = identities
    r = start_round(ids[:5], pins, bfv_public, N)
    updates, weights = make_updates(list(r.banks), N)
    honest = through_masked_input(r, updates, weights, bfv_public)["bank0"]
    others = [x for x in honest.receipts if x.bank_id != "bank4"]
    claims_dropped = dataclasses.replace(
        honest, survivors=("bank0", "bank1", "bank2", "bank3"), dropped=("bank4",), receipts=tuple(others)
    )
    leaves_out = dataclasses.replace(claims_dropped, dropped=())  # bank4 neither survived nor dropped
    for view in (claims_dropped, leaves_out):  # a view that is not "every sender survived" needs consents
        with pytest.raises(CryptoError) as e:
            r.banks["bank0"].unmask(UnmaskOrder(request=view, consents=()))
        assert e.value.reason == "inconsistent" and r.banks["bank0"].stage == "masked"
    reply = r.banks["bank0"].unmask(UnmaskOrder(request=honest, consents=()))
    assert sorted(s.dealer for s in reply.shares) == sorted(r.banks) and {s.kind for s in reply.shares} == {"self_mask"}
    # bank0 now neither signs nor unmasks the view in which bank4 dropped, quorum or not
    quorum = _consents(r, claims_dropped, ["bank1", "bank2", "bank3"])
    with pytest.raises(CryptoError, match="second") as e:
        r.banks["bank0"].consent(claims_dropped)
    with pytest.raises(CryptoError, match="consented to"):
        r.banks["bank0"].unmask(UnmaskOrder(request=claims_dropped, consents=quorum))
    assert set(r.banks["bank0"].released.values()) == {"self_mask"}
    # bank1 signed the view with bank4 dropped: it refuses the order without consents
    with pytest.raises(CryptoError, match="second") as e:
        r.banks["bank1"].unmask(UnmaskOrder(request=honest, consents=()))
    assert e.value.reason == "inconsistent" and r.banks["bank1"].released == {}


def test_unsigned_survivor_is_refused(identities, bfv_public) -> None:
    ids, pins = identities
    r = start_round(ids[:4], pins, bfv_public, N)
    updates, weights = make_updates(list(r.banks), N)
    honest = through_masked_input(r, updates, weights, bfv_public, skip=("bank3",))["bank0"]
    # The server claims bank3 survived (to get its self mask), but cannot show bank3's signed receipt.
    forged = dataclasses.replace(
        honest,
        survivors=(*honest.survivors, "bank3"),
        dropped=(),
        receipts=(*honest.receipts, dataclasses.replace(honest.receipts[0], bank_id="bank3")),
    )
    with pytest.raises(CryptoError) as e:
        r.banks["bank0"].consent(forged)
    assert e.value.reason == "signature"


def test_threshold_resists_the_server_plus_one_bank() -> None:
    for h in range(2, 70):
        t = default_threshold(h)
        assert t <= h and t >= 2
        assert 2 * t > h + 1, h  # both secrets of an honest bank need 2(t-1) > h-1 honest holders
        assert t >= min_secure_threshold(h, 1)


def test_setup_below_the_secure_threshold_is_refused(identities, bfv_public) -> None:
    ids, pins = identities
    setup = ServerSecAgg.make_setup(
        job_id=JOB, round=1, participants=[i.bank_id for i in ids[:3]], n_elements=10, key=bfv_public, threshold=2
    )
    with pytest.raises(CryptoError, match="threshold 2 is outside") as e:
        BankSecAgg(ids[0], pins).advertise(setup)
    assert e.value.reason == "inconsistent"
    with pytest.raises(CryptoError, match="threshold"):
        ServerSecAgg(setup, pins, bfv_public)


def test_k_regular_neighbourhoods(identities, bfv_public, bfv_secret) -> None:
    ids, pins = identities
    r = start_round(ids[:8], pins, bfv_public, 500, neighbours_k=4)  # holders 5 -> t = 4
    assert r.setup.threshold == 4
    updates, weights = make_updates(list(r.banks), 500)
    run_round(r, updates, weights, bfv_public, drop_before_input=("bank5",))
    _check_sum(r, updates, weights, [b for b in r.banks if b != "bank5"], bfv_secret, pins)
    for b, bank in r.banks.items():
        if b != "bank5":
            assert len(bank._neighbours()) == 4


def test_k_regular_neighbourhoods_always_collect_consents(identities, bfv_public, bfv_secret) -> None:
    """Under k-regular neighbourhoods the quorum (> t) is what keeps banks on one view: with views
    that need no consent, a server could pair self-mask releases of a victim's holders with a
    quorum view that drops the victim's masking partners. So nobody skips consents there."""
    ids, pins = identities
    r = start_round(ids[:8], pins, bfv_public, 500, neighbours_k=4)
    updates, weights = make_updates(list(r.banks), 500)
    request = through_masked_input(r, updates, weights, bfv_public)["bank0"]
    assert r.server.dropped == () and r.server.orders_without_consent() is None
    with pytest.raises(CryptoError, match="k-regular") as e:
        r.banks["bank0"].unmask(UnmaskOrder(request=request, consents=()))
    assert e.value.reason == "inconsistent" and r.banks["bank0"].stage == "masked" and not r.banks["bank0"].released
    r = start_round(ids[:8], pins, bfv_public, 500, neighbours_k=4)
    run_round(r, updates, weights, bfv_public, skip_consent=True)  # the server collects consents anyway
    assert "consistency" in r.seen
    _check_sum(r, updates, weights, list(r.banks), bfv_secret, pins)


def test_state_survives_a_process_per_stage(identities, bfv_public, bfv_secret) -> None:
    """Flower runs each message in a new ClientApp process: rebuild every bank from JSON between stages."""
    ids, pins = identities
    by_id = {i.bank_id: i for i in ids}
    r = start_round(ids[:4], pins, bfv_public, N)
    updates, weights = make_updates(list(r.banks), N)

    def reload(b: str) -> BankSecAgg:
        state = json.loads(json.dumps(r.banks[b].state_dict()))
        r.banks[b] = BankSecAgg.from_state(state, by_id[b], pins)
        return r.banks[b]

    adv = {b: bank.advertise(r.setup).to_bytes() for b, bank in r.banks.items()}
    reqs = r.server.receive_advertisements(adv)
    reqs = r.server.receive_shares({b: reload(b).share_keys(q).to_bytes() for b, q in reqs.items()})
    reqs = r.server.receive_masked_inputs(
        {b: reload(b).masked_input(q, updates[b], weights[b], bfv_public).to_bytes() for b, q in reqs.items()}
    )
    orders = r.server.receive_consents({b: reload(b).consent(q).to_bytes() for b, q in reqs.items()})
    r.aggregate = r.server.receive_unmask({b: reload(b).unmask(q).to_bytes() for b, q in orders.items()})
    _check_sum(r, updates, weights, list(r.banks), bfv_secret, pins)


def test_aggregate_checks_contributors(identities, bfv_public, bfv_secret) -> None:
    ids, pins = identities
    r = start_round(ids[:4], pins, bfv_public, N, min_banks=3)
    updates, weights = make_updates(list(r.banks), N)
    agg = run_round(r, updates, weights, bfv_public)
    forged = dataclasses.replace(
        agg, receipts=(*agg.receipts[:-1], dataclasses.replace(agg.receipts[-1], masked_with=()))
    )
    with pytest.raises(CryptoError) as e:
        open_aggregate(forged, setup=r.setup, key=bfv_secret, pins=pins)
    assert e.value.reason == "signature"
    short = dataclasses.replace(agg, contributors=agg.contributors[:2], receipts=agg.receipts[:2])
    with pytest.raises(CryptoError) as e:
        open_aggregate(short, setup=r.setup, key=bfv_secret, pins=pins, min_banks=3)
    assert e.value.reason == "too_few"


def test_server_refuses_a_secret_key_and_imports_no_secret_code(identities, bfv_secret) -> None:
    ids, pins = identities
    setup = ServerSecAgg.make_setup(
        job_id=JOB, round=1, participants=[i.bank_id for i in ids[:4]], n_elements=10, key=bfv_secret
    )
    with pytest.raises(CryptoError, match="secret key"):
        ServerSecAgg(setup, pins, bfv_secret)
    code = (
        "import sys, fedmoe.crypto.secagg.server; "
        "bad = [m for m in ('fedmoe.crypto.secagg.bank', 'fedmoe.crypto.secagg.bfv_secret', "
        "'fedmoe.crypto.secagg.ceremony') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_messages_round_trip_and_reject_garbage(identities, bfv_public) -> None:
    ids, pins = identities
    r = start_round(ids[:4], pins, bfv_public, 100)
    updates, weights = make_updates(list(r.banks), 100)
    run_round(r, updates, weights, bfv_public)
    raw = r.seen["masked_input"]["bank0"]
    msg = MaskedInput.from_bytes(raw)
    assert msg.to_bytes() == raw and MaskedInput.from_dict(msg.to_dict()) == msg
    other = ShareKeysReply(bank_id="a", job_id="j", round=1, shares=()).to_bytes()
    for bad in (b"", b"x" * 40, raw[:20], other):
        with pytest.raises(CryptoError) as e:
            MaskedInput.from_bytes(bad)
        assert e.value.reason == "malformed"
    with pytest.raises(CryptoError) as e:
        EncryptedShare.from_dict({"dealer": "a", "recipient": "b", "nonce": "zz", "ciphertext": ""})
    assert e.value.reason == "malformed"


# ------------------------------------------------------------------------------------------------
# the coalition: the server's whole view + one bank's BFV secret key and all of its round secrets


def test_server_plus_one_bank_learns_nothing_about_another_bank(identities, bfv_public, bfv_secret) -> None:
    stats = pytest.importorskip("scipy.stats")
    ids, pins = identities
    n = 200_000  # about the `small` preset's LoRA view (219,136 floats)
    r = start_round(ids[:4], pins, bfv_public, n)
    banks = list(r.banks)
    updates, weights = make_updates(banks, n, seed=7)
    run_round(r, updates, weights, bfv_public)
    _check_sum(r, updates, weights, banks, bfv_secret, pins)  # the honest sum is right

    victim, colluder = "bank1", "bank0"
    setup, params = r.setup, r.setup.params
    t = params.plain_modulus
    # 1. decrypt the victim's individual ciphertext with the colluder's BFV secret key
    victim_bundle = MaskedInput.from_bytes(r.seen["masked_input"][victim]).bundle
    _, residues = decrypt_residues(victim_bundle, bfv_secret)
    # 2. remove everything the coalition can: the victim's self mask (the server reconstructs it
    #    from the survivors' shares) and the colluder<->victim pairwise mask (the colluder's secret)
    shares = {}
    for raw in r.seen["unmask"].values():
        for s in UnmaskReply.from_bytes(raw).shares:
            if s.dealer == victim:
                shares[s.x] = s.y
    seed = shamir_combine(dict(list(shares.items())[: setup.threshold]))
    residues = sub_mod(residues, self_mask(seed, n + 1, t, job_id=JOB, round=setup.round, bank_id=victim), t)
    col = r.banks[colluder]
    pseed = pair_seed(col.mask_sk, col.peers[victim].mask_pk, job_id=JOB, round=setup.round, a=colluder, b=victim)
    m = pair_mask(pseed, n + 1, t)
    residues = sub_mod(residues, m, t) if victim < colluder else (residues + m) % np.uint64(t)
    # 3. what is left is uniform modulo t and uncorrelated with the victim's update
    u = residues.astype(np.float64) / t
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    counts = np.bincount((u * 64).astype(int), minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-4
    recovered = dequantize(residues, params)[:n] / weights[victim]
    assert abs(np.corrcoef(recovered, updates[victim])[0, 1]) < 0.01
    assert abs(np.corrcoef(u[:n], updates[victim])[0, 1]) < 0.01
    # Control: the test has the power to see a leak. With the two honest peers' mask keys too
    # (which the coalition does not have), the victim's update appears exactly.
    for peer in ("bank2", "bank3"):
        p = r.banks[peer]
        seed = pair_seed(p.mask_sk, p.peers[victim].mask_pk, job_id=JOB, round=setup.round, a=peer, b=victim)
        m = pair_mask(seed, n + 1, t)
        residues = sub_mod(residues, m, t) if victim < peer else (residues + m) % np.uint64(t)
    opened = dequantize(residues, params)
    assert opened[n] == weights[victim]
    assert np.abs(opened[:n] / weights[victim] - updates[victim]).max() < 1 / params.scale
