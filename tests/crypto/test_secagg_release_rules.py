"""The bank's release rules for unmask orders (issue 32): each consent counts only for its own view,
its own round and its own signer, and only a survivor's.

The split-view test in test_crypto_secagg.py mixes consents of banks that are not survivors of the
ordered view, so the survivor check stops it before the view digest is compared; here every signer
is a survivor of the ordered view and only the digest (or the round, or the signature) is wrong.
"""

from __future__ import annotations

import dataclasses

import pytest
from secagg_helpers import JOB, make_updates, split_views, start_round, through_masked_input

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.secagg.bank import BankSecAgg
from fedmoe.crypto.secagg.common import consent_quorum
from fedmoe.crypto.secagg.messages import UnmaskConsent, UnmaskOrder

N = 64


@pytest.fixture
def two_views(identities, bfv_public):
    """Five banks after masked input (t = quorum = 4); the honest view (everyone survived) and view B
    (bank3 dropped: its mask key would be released), which bank0 has consented to."""
    r, ids, honest, view_b = split_views(identities, bfv_public, N)
    own = r.banks["bank0"].consent(view_b)
    return r, ids, honest, view_b, own


def _signed(ids, u: int, view, *, round: int = 1, job: str = JOB) -> UnmaskConsent:
    return UnmaskConsent.signed(ids[u], bank_id=f"bank{u}", job_id=job, round=round, view_sha256=view.view_sha256())


def test_consents_of_survivors_on_another_view_do_not_count(two_views):
    """bank1, bank2 and bank4 survive in view B but signed the honest view: with bank0's own consent
    that is 4 signers, a quorum only if the digest they signed were not compared."""
    r, ids, honest, view_b, own = two_views
    others = tuple(r.banks[f"bank{u}"].consent(honest) for u in (1, 2, 4))
    with pytest.raises(CryptoError, match="not for this view") as err:
        r.banks["bank0"].unmask(UnmaskOrder(request=view_b, consents=(own, *others)))
    assert err.value.reason == "inconsistent" and r.banks["bank0"].released == {}


def test_a_quorum_on_the_view_releases(two_views):
    """The same order with every consent on view B (bank1, 2, 4 colluding with the server) is taken:
    the test above fails for the digest alone."""
    r, ids, honest, view_b, own = two_views
    reply = r.banks["bank0"].unmask(
        UnmaskOrder(request=view_b, consents=(own, *(_signed(ids, u, view_b) for u in (1, 2, 4))))
    )
    assert {s.dealer: s.kind for s in reply.shares}["bank3"] == "mask_key"
    assert r.banks["bank0"].released["bank3"] == "mask_key"


def test_consents_below_the_quorum_release_nothing(two_views):
    r, ids, honest, view_b, own = two_views
    with pytest.raises(CryptoError, match="3 banks consented to this view, need 4; nothing released") as err:
        r.banks["bank0"].unmask(UnmaskOrder(request=view_b, consents=(own, *(_signed(ids, u, view_b) for u in (1, 2)))))
    assert err.value.reason == "too_few" and r.banks["bank0"].released == {}


def test_a_consent_counts_once_per_signer(two_views):
    r, ids, honest, view_b, own = two_views
    twice = (own, _signed(ids, 1, view_b), _signed(ids, 1, view_b), _signed(ids, 2, view_b))
    with pytest.raises(CryptoError) as err:
        r.banks["bank0"].unmask(UnmaskOrder(request=view_b, consents=twice))
    assert err.value.reason == "too_few" and r.banks["bank0"].released == {}


def test_a_consent_of_a_dropped_bank_does_not_count(two_views):
    r, ids, honest, view_b, own = two_views
    dropped = _signed(ids, 3, view_b)  # bank3's real signature, but bank3 is not a survivor of view B
    order = UnmaskOrder(request=view_b, consents=(own, _signed(ids, 1, view_b), _signed(ids, 2, view_b), dropped))
    with pytest.raises(CryptoError, match="not for this view"):
        r.banks["bank0"].unmask(order)
    assert r.banks["bank0"].released == {}


@pytest.mark.parametrize("other", [{"round": 2}, {"job": "another-job"}])
def test_a_consent_for_another_round_or_job_is_a_replay(two_views, other):
    r, ids, honest, view_b, own = two_views
    stale = _signed(ids, 4, view_b, **other)
    order = UnmaskOrder(request=view_b, consents=(own, _signed(ids, 1, view_b), _signed(ids, 2, view_b), stale))
    with pytest.raises(CryptoError, match="consent of 'bank4' for another round") as err:
        r.banks["bank0"].unmask(order)
    assert err.value.reason == "replay" and r.banks["bank0"].released == {}


def test_a_consent_signed_by_another_key_is_refused(two_views):
    r, ids, honest, view_b, own = two_views
    forged = UnmaskConsent.signed(ids[2], bank_id="bank4", job_id=JOB, round=1, view_sha256=view_b.view_sha256())
    order = UnmaskOrder(request=view_b, consents=(own, _signed(ids, 1, view_b), _signed(ids, 2, view_b), forged))
    with pytest.raises(CryptoError):
        r.banks["bank0"].unmask(order)
    assert r.banks["bank0"].released == {}


def test_an_order_without_consents_takes_only_the_everyone_survived_view(two_views):
    """Rule CF: without consents, only the view in which every participant survived, and it binds the bank."""
    r, ids, honest, view_b, own = two_views
    bank1 = r.banks["bank1"]  # has signed nothing this round
    leaves_out = dataclasses.replace(view_b, dropped=())  # bank3 neither survived nor dropped
    for view in (view_b, leaves_out):
        with pytest.raises(CryptoError, match=r"must be the view in which every participant survived.*rule CF") as err:
            bank1.unmask(UnmaskOrder(request=view, consents=()))
        assert err.value.reason == "inconsistent" and bank1.stage == "masked" and bank1.released == {}
    order = UnmaskOrder(request=honest, consents=())
    reply = bank1.unmask(order)
    assert sorted(s.dealer for s in reply.shares) == sorted(r.banks) and {s.kind for s in reply.shares} == {"self_mask"}
    assert bank1.stage == "unmasked" and bank1.unmask(order) == reply  # a retry gets the same shares
    with pytest.raises(CryptoError, match=r"not the view this bank consented to \(rule U1\)") as err:
        bank1.unmask(UnmaskOrder(request=view_b, consents=(own, *(_signed(ids, u, view_b) for u in (2, 4)))))
    assert err.value.reason == "inconsistent" and set(bank1.released.values()) == {"self_mask"}


def test_an_order_for_a_view_the_bank_did_not_sign_is_refused_whatever_its_consents(two_views):
    """bank0 signed view B; an order for the honest view carrying a quorum of consents on view B
    would otherwise release bank3's self mask to a bank that already agreed to release its mask key."""
    r, ids, honest, view_b, own = two_views
    on_b = (own, *(_signed(ids, u, view_b) for u in (1, 2, 4)))
    with pytest.raises(CryptoError, match=r"not the view this bank consented to \(rule U1\)") as err:
        r.banks["bank0"].unmask(UnmaskOrder(request=honest, consents=on_b))
    assert err.value.reason == "inconsistent" and r.banks["bank0"].released == {}
    with pytest.raises(CryptoError, match="rule U1"):  # bank2 has signed nothing: no order with consents
        r.banks["bank2"].unmask(UnmaskOrder(request=view_b, consents=on_b))


def test_an_order_for_another_round_is_a_replay(two_views):
    r, ids, honest, view_b, own = two_views
    stale = dataclasses.replace(view_b, round=2)
    with pytest.raises(CryptoError, match=r"^unmask: job/round expected") as err:
        r.banks["bank0"].unmask(UnmaskOrder(request=stale, consents=(own,)))
    assert err.value.reason == "replay" and r.banks["bank0"].released == {}


def test_a_quorum_order_retried_gets_the_same_shares_and_the_other_share_is_never_released(two_views):
    r, ids, honest, view_b, own = two_views
    order = UnmaskOrder(request=view_b, consents=(own, *(_signed(ids, u, view_b) for u in (1, 2, 4))))
    reply = r.banks["bank0"].unmask(order)
    assert r.banks["bank0"].unmask(order) == reply
    kinds = {s.dealer: s.kind for s in reply.shares}
    assert kinds == {"bank0": "self_mask", "bank1": "self_mask", "bank2": "self_mask", "bank3": "mask_key",
                     "bank4": "self_mask"}  # fmt: skip


def test_a_bank_that_released_one_share_of_a_peer_never_releases_the_other(two_views):
    """The last line of defence (its state says bank3's self mask went out, e.g. restored from disk)."""
    r, ids, honest, view_b, own = two_views
    r.banks["bank0"].released["bank3"] = "self_mask"
    order = UnmaskOrder(request=view_b, consents=(own, *(_signed(ids, u, view_b) for u in (1, 2, 4))))
    with pytest.raises(CryptoError, match="both shares of 'bank3' requested") as err:
        r.banks["bank0"].unmask(order)
    assert err.value.reason == "inconsistent" and r.banks["bank0"].released == {"bank3": "self_mask"}


def test_k_regular_neighbourhoods_take_no_order_without_consents(identities, bfv_public):
    ids, pins = identities
    r = start_round(ids[:8], pins, bfv_public, N, neighbours_k=4)
    updates, weights = make_updates(list(r.banks), N)
    request = through_masked_input(r, updates, weights, bfv_public)["bank0"]
    with pytest.raises(
        CryptoError, match=r"^unmask: an order without consents under k-regular .*refused \(rule CF\)$"
    ) as err:
        r.banks["bank0"].unmask(UnmaskOrder(request=request, consents=()))
    assert err.value.reason == "inconsistent" and r.banks["bank0"].stage == "masked" and not r.banks["bank0"].released


def test_an_order_without_consents_is_held_to_the_view_the_bank_signed(two_views):
    """bank0 signed view B; the everyone-survived view without consents is a second view (rule V8)."""
    r, ids, honest, view_b, own = two_views
    with pytest.raises(CryptoError, match=r"^unmask\(bank 'bank0'\): a second, different unmask view .*rule V8") as err:
        r.banks["bank0"].unmask(UnmaskOrder(request=honest, consents=()))
    assert err.value.reason == "inconsistent" and r.banks["bank0"].released == {}


def test_released_shares_are_the_held_ones_of_the_right_kind(two_views):
    """Each share is the one this bank holds of that dealer: self-mask share of a survivor, mask-key
    share of the dropped bank, with the dealer's signature; a dealer it holds nothing of is skipped."""
    r, ids, honest, view_b, own = two_views
    bank0 = r.banks["bank0"]
    del bank0.held["bank1"]  # as if bank1 had sent bank0 no share: the others are still released
    bank0.timings["unmask"] = 100.0
    reply = bank0.unmask(UnmaskOrder(request=view_b, consents=(own, *(_signed(ids, u, view_b) for u in (1, 2, 4)))))
    assert 100.0 < bank0.timings["unmask"] < 160.0  # its own time added to what consent took
    assert sorted(s.dealer for s in reply.shares) == ["bank0", "bank2", "bank3", "bank4"]
    for share in reply.shares:
        held = bank0.held[share.dealer]
        mask_key = share.dealer == "bank3"
        assert share.kind == ("mask_key" if mask_key else "self_mask") and share.holder == "bank0" and share.x == held.x
        expected = (held.mask_key, held.mask_key_sig) if mask_key else (held.self_mask, held.self_mask_sig)
        assert (share.y, share.dealer_signature) == expected


def test_the_quorum_counts_the_banks_own_colluders_under_k_regular_neighbourhoods(identities, bfv_public):
    """8 banks, 4 neighbours each, banks assuming 2 colluders: the quorum is 6 (5 with one colluder)."""
    ids, pins = identities
    r = start_round(ids[:8], pins, bfv_public, N, neighbours_k=4)
    r.banks = {i.bank_id: BankSecAgg(i, pins, colluding=2) for i in ids[:8]}
    updates, weights = make_updates(list(r.banks), N)
    request = through_masked_input(r, updates, weights, bfv_public)["bank0"]
    assert consent_quorum(r.setup, 2) == 6 > consent_quorum(r.setup, 1)
    five = tuple(r.banks[f"bank{u}"].consent(request) for u in range(5))
    with pytest.raises(CryptoError, match="5 banks consented to this view, need 6") as err:
        r.banks["bank0"].unmask(UnmaskOrder(request=request, consents=five))
    assert err.value.reason == "too_few" and not r.banks["bank0"].released
