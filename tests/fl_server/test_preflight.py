"""Pre-flight: no honest bank trains in a round that refusals will abort (issue 27; in-process rounds).

On the old code a bank's policy refusal showed up only at the masked-input stage, after keys were
shared and the other banks had trained and spent their budget: a masked round then aborted below
its threshold, and every bank, culprits included, was recorded as "round aborted". Two of five
banks could drain every honest bank's budget this way. Now each bank answers a pre-flight with the
keys it shares, and only ready banks are asked to train, only when they are enough.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from local_grid import KEEP_DELTAS_POLICY, LocalGrid
from test_secagg_rounds import assert_mean_of_kept_deltas, banks, keys, run_config, run_job  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.federation]


def refusing(tmp_path: Path, nodes: dict[int, dict], refusers: list[str]) -> dict[int, dict]:
    """`refusers` get a policy whose lifetime budget (epsilon 1) is below the job's: they refuse it."""
    policy = tmp_path / "refusing-policy.toml"
    policy.write_text(Path(KEEP_DELTAS_POLICY).read_text() + "epsilon = 1.0\n")
    return {n: c | {"policy-file": str(policy)} if c["bank-id"] in refusers else c for n, c in nodes.items()}


def trained_rounds(tmp_path: Path, bank: str) -> list[int]:
    ledgers = list((tmp_path / "banks" / bank).glob("privacy/*/ledger.jsonl"))
    entries = [json.loads(line) for path in ledgers for line in path.read_text().splitlines()]
    return [e["round"] for e in entries if e["status"] == "trained"]


def test_a_bank_refusing_at_pre_flight_is_left_out_before_anyone_trains(tmp_path, keys):  # noqa: F811
    config = run_config(tmp_path, **{"epsilon": 8.0})
    state = run_job(tmp_path, LocalGrid(refusing(tmp_path, banks(4), ["bank-3"]), config), config)
    three = ["bank-0", "bank-1", "bank-2"]
    r1, r2 = state.rounds
    assert r1.aggregated and r1.participants == three, (r1.no_aggregate, r1.left_out)
    assert r1.outcomes["bank-3"] == "refused" and r1.left_out["bank-3"].startswith("refused: pre-flight:")
    assert "rule 'epsilon'" in r1.left_out["bank-3"]
    assert_mean_of_kept_deltas(tmp_path, 1, three)
    assert r2.aggregated and r2.participants == three and r2.outcomes["bank-3"] == "not selected"
    assert trained_rounds(tmp_path, "bank-3") == []  # never asked to train: nothing spent, no masked input
    assert all(trained_rounds(tmp_path, b) == [1, 2] for b in three)


def test_too_few_ready_banks_start_no_round_and_nobody_spends(tmp_path, keys):  # noqa: F811
    config = run_config(tmp_path, **{"epsilon": 8.0})
    state = run_job(tmp_path, LocalGrid(refusing(tmp_path, banks(4), ["bank-2", "bank-3"]), config), config)
    r1 = state.rounds[0]
    assert not r1.aggregated
    assert "pre-flight: 2 of 4 banks ready, the round needs 3: nobody trained" in r1.no_aggregate
    assert "caused by: bank-2 refused (pre-flight: " in r1.no_aggregate and "bank-3 refused" in r1.no_aggregate
    assert r1.outcomes["bank-0"] == r1.outcomes["bank-1"] == "aborted by others"
    assert r1.outcomes["bank-2"] == r1.outcomes["bank-3"] == "refused"
    for bank in ("bank-0", "bank-1", "bank-2", "bank-3"):  # the honest banks spent nothing
        assert trained_rounds(tmp_path, bank) == []
    assert not (tmp_path / "server" / "secagg" / "aggregates" / "round-0001.bundle").exists()
