"""A bank that refuses costs the honest banks nothing, on a real loopback federation (issue 27).

Measured on the old code: one bank lowering its policy to epsilon 1 aborted a 3-of-3 round after the
other banks had trained and spent their budget for nothing. Now the refusal comes at the pre-flight,
before anyone trains: the round starts no training, names the refusing bank, and no ledger holds a
trained round. Real SuperLink, SuperNodes and executors on 127.0.0.1, secure aggregation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_federation_e2e import POLICY, free_port_block, job_config, read_state

from fedmoe.fl_server.launch import loopback

pytestmark = [pytest.mark.slow, pytest.mark.federation]


def trained_entries(root: Path, bank: str) -> list[dict]:
    ledgers = (root / "banks" / bank).glob("privacy/*/ledger.jsonl")
    entries = [json.loads(line) for path in ledgers for line in path.read_text().splitlines()]
    return [e for e in entries if e["status"] == "trained"]


def test_a_policy_refusal_aborts_the_round_before_any_bank_trains(tmp_path):
    run_config, job = job_config(
        tmp_path,
        **{"job-id": "refusal", "aggregation": "secagg", "num-rounds": 1, "min-banks": 3, "evaluate": False},
    )
    text = Path(POLICY).read_text(encoding="utf-8")
    assert "\nepsilon = 8.0" in text
    refusing = tmp_path / "refusing-policy.toml"  # a lifetime budget below the job's epsilon 8
    refusing.write_text(text.replace("\nepsilon = 8.0", "\nepsilon = 1.0"), encoding="utf-8")
    policy_files = {"bank-0": POLICY, "bank-1": POLICY, "bank-2": str(refusing)}
    with loopback(3, tmp_path, base_port=free_port_block(), policy_files=policy_files) as deployment:
        deployment.flwr_run(run_config, timeout=540)

    state = read_state(job)
    assert state["finished"], state.get("end_reason")
    (round1,) = state["rounds"]
    # nobody spent budget on the round that could not finish (the old code: bank-0 and bank-1 trained
    # it, epsilon 7.82 each, and the round aborted at the masked input when bank-2 refused there)
    for bank in ("bank-0", "bank-1", "bank-2"):
        assert trained_entries(tmp_path, bank) == [], bank
    assert not round1["aggregated"]
    assert "pre-flight: 2 of 3 banks ready, the round needs 3: nobody trained" in round1["no_aggregate"]
    assert "caused by: bank-2 refused (pre-flight: " in round1["no_aggregate"], round1["no_aggregate"]
    assert round1["outcomes"] == {"bank-0": "aborted by others", "bank-1": "aborted by others", "bank-2": "refused"}
