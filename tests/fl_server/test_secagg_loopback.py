"""Secure aggregation over a real loopback federation: SuperLink, 4 SuperNodes, executors, DP-SGD, BFV.

bank-3 is killed either once its masked input of round 1 is in (the unmask order reached it):
round 1 still aggregates all four inputs (its self mask is rebuilt from the others' shares); or as
soon as the masked-input request reaches it, before it can answer: round 1 aggregates the three
others (its pairwise masks are rebuilt from its mask-key shares and removed). Round 2 runs with the
three left.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from local_grid import KEEP_DELTAS_POLICY
from test_federation_e2e import free_port_block, wait_for  # the shared loopback helpers

from fedmoe.crypto.identity import load_pins
from fedmoe.crypto.secagg.bank import open_aggregate
from fedmoe.crypto.secagg.bfv import SECRET_FILE as BFV_SECRET_FILE
from fedmoe.crypto.secagg.bfv_secret import load_bfv_secret
from fedmoe.crypto.secagg.messages import RoundSetup, SecureAggregate
from fedmoe.fl_client.state import load_tensors
from fedmoe.fl_server.launch import job_paths, loopback
from fedmoe.protocol.config import PINS_FILE
from fedmoe.protocol.messages import unpack_secagg_result

pytestmark = [pytest.mark.slow, pytest.mark.federation]


@pytest.mark.parametrize(
    "kill_on,round1_banks",
    [("train.secagg_unmask", 4), ("train.secagg_masked_input", 3)],
    ids=["killed-after-its-masked-input", "killed-before-its-masked-input"],
)
def test_four_banks_secagg_survives_a_bank_killed_around_its_masked_input(tmp_path, kill_on, round1_banks):
    run_config = {
        **job_paths(tmp_path),
        "job-id": "sa-e2e",
        "aggregation": "secagg",
        "num-rounds": 2,
        "min-banks": 3,
        "rejoin-grace": 5.0,  # bank-3 never comes back: the server waits this long once, before round 2
        "model-preset": "tiny",
        "local-steps": 3,
        "records-per-bank": 240,
        "synthetic-banks": 4,
        "seq-len": 48,
        "evaluate": False,
        "round-timeout": 300.0,  # a loaded 2-core host trains 4 banks at once
    }
    state_file = tmp_path / "server" / "sa-e2e" / "state.json"
    policies = {f"bank-{i}": KEEP_DELTAS_POLICY for i in range(4)}
    with loopback(4, tmp_path, base_port=free_port_block(), policy_files=policies) as deployment:
        submit = deployment.flwr_run(run_config, timeout=120, stream=False)
        assert submit.returncode == 0
        log = deployment.log_dir / "bank-3.log"
        wait_for(
            lambda: log.exists() and f"Receiving: {kill_on}" in log.read_text(errors="replace"),
            1200,
            f"bank-3 to receive {kill_on}",
        )
        deployment.kill("bank-3-apps")
        deployment.kill("bank-3")
        # results.json comes after the closing message that delivers the last aggregate to the banks
        wait_for(lambda: (state_file.parent / "results.json").exists(), 1500, "the job to finish")
    state = json.loads(state_file.read_text())
    r1, r2 = state["rounds"]
    four = ["bank-0", "bank-1", "bank-2", "bank-3"]
    assert r1["aggregated"] and r1["participants"] == four[:round1_banks], r1
    assert r2["aggregated"] and r2["participants"] == four[:3], r2
    key = load_bfv_secret(tmp_path / "keys" / BFV_SECRET_FILE)
    pins = load_pins(tmp_path / "keys" / PINS_FILE)
    for round_idx, contributors in ((1, four[:round1_banks]), (2, four[:3])):
        blob = (tmp_path / "server" / "sa-e2e" / "aggregates" / f"round-{round_idx:04d}.bundle").read_bytes()
        setup_bytes, aggregate_bytes = unpack_secagg_result(blob)
        setup, aggregate = RoundSetup.from_bytes(setup_bytes), SecureAggregate.from_bytes(aggregate_bytes)
        mean, total = open_aggregate(aggregate, setup=setup, key=key, pins=pins, min_banks=3)
        assert total == len(contributors)
        deltas = [
            load_tensors(
                Path(tmp_path / "banks" / b / "jobs" / "sa-e2e" / "deltas" / f"round-{round_idx:04d}.safetensors")
            )
            for b in contributors
        ]
        plain = sum(d["delta"].double().numpy() for d in deltas) / len(contributors)
        assert np.abs(plain).max() > 1e-4 and np.abs(mean - plain).max() <= 2.0**-21 + 1e-9
    for bank in four[:3]:
        bank_state = json.loads((tmp_path / "banks" / bank / "jobs" / "sa-e2e" / "state.json").read_text())
        assert bank_state["applied_round"] == 2 and bank_state["rounds_trained"] == [1, 2]
    if round1_banks == 3:  # dropped before its masked input: its round-1 delta never reached the sum
        assert "bank-3" in r1["left_out"], r1["left_out"]
