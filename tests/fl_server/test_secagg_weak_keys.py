"""A bank that advertises a low-order X25519 key costs the honest banks nothing (issue 25, item 2).

In-process federation (real ClientApps, DP-SGD, BFV): bank-3 advertises, every round, a mask key of
order 8 under a valid signature. On the starting code the server relayed it, every honest bank
trained (spending epsilon) and then failed to derive its pairwise mask with bank-3, so no round
produced an aggregate and every honest bank paid for each. Now the server excludes bank-3 at
advertisement (`weak_key`), the other three aggregate, and each epsilon an honest bank spends is
in an aggregate.
"""

from __future__ import annotations

import dataclasses

import pytest
from local_grid import LocalGrid
from test_secagg_rounds import assert_mean_of_kept_deltas, banks, ledger_rounds, run_config, run_job

from fedmoe.crypto.secagg import bank as secagg_bank
from fedmoe.crypto.secagg.messages import KeyAdvertisement
from fedmoe.fl_server.ceremony import loopback_ceremony

pytestmark = [pytest.mark.slow, pytest.mark.federation]

ORDER_8 = (325606250916557431795983626356110631294008115727848805560023387167927233504).to_bytes(32, "little")


def test_a_low_order_mask_key_excludes_its_advertiser_and_costs_the_honest_banks_nothing(tmp_path, monkeypatch):
    loopback_ceremony(tmp_path / "keys", [f"bank-{i}" for i in range(4)])
    honest_advertise = secagg_bank.BankSecAgg.advertise

    def advertise(self, setup, key=None):
        adv = honest_advertise(self, setup, key) if key is not None else honest_advertise(self, setup)
        if self.bank_id != "bank-3":
            return adv
        fields = {f.name: getattr(adv, f.name) for f in dataclasses.fields(adv) if f.name != "signature"}
        self.advertisement = KeyAdvertisement.signed(self.identity, **(fields | {"mask_pk": ORDER_8}))
        return self.advertisement

    monkeypatch.setattr(secagg_bank.BankSecAgg, "advertise", advertise)
    config = run_config(tmp_path, **{"min-banks": 3})
    state = run_job(tmp_path, LocalGrid(banks(4), config), config)

    honest = ["bank-0", "bank-1", "bank-2"]
    assert state.finished and all(r.aggregated for r in state.rounds), [r.no_aggregate for r in state.rounds]
    for r in state.rounds:
        assert r.participants == honest
        assert r.outcomes["bank-3"] == "excluded by secure aggregation"
        assert "advertise (weak_key)" in r.left_out["bank-3"] and "small order" in r.left_out["bank-3"]
        assert_mean_of_kept_deltas(tmp_path, r.round, honest)
    for bank in honest:  # every epsilon spent bought a contribution to an aggregate
        assert ledger_rounds(tmp_path, bank) == [(1, "trained"), (2, "trained")]
    assert not (tmp_path / "banks" / "bank-3" / "privacy").exists() or ledger_rounds(tmp_path, "bank-3") == []
