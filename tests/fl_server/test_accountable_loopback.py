"""An accountable round over a real loopback federation of 4 banks (issue 25, "Done when").

bank-3 poisons round 2 (tests/fl_server/hostile/sitecustomize.py masks its delta x 1e6; its input
is otherwise valid). Every bank's policy allows `reveal-on-quarantine`. In round 3 the honest banks
reject round 2's aggregate, the server quarantines it, runs the reveal and accuse exchanges
(fedmoe.fl_server.accountability), names bank-3 by the banks' signed verdicts, excludes it and runs
round 3 again with the other three, whose replicas then hold their plaintext mean.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from local_grid import KEEP_DELTAS_LINE
from test_federation_e2e import free_port_block, wait_for
from test_hostile_loopback import FACTOR, HOSTILE, bank_dir, read_json, replica_round, run_config

from fedmoe.audit.verify import audit_ledgers
from fedmoe.crypto.identity import load_pins
from fedmoe.crypto.secagg.accountability import name_poisoners
from fedmoe.crypto.secagg.bfv import SECRET_FILE as BFV_SECRET_FILE
from fedmoe.crypto.secagg.bfv_secret import load_bfv_secret
from fedmoe.crypto.secagg.messages import QuarantineEvidence, RoundReveal, Verdict
from fedmoe.crypto.secagg.params import SecAggParams
from fedmoe.fl_client.state import load_tensors
from fedmoe.fl_client.task import build_model
from fedmoe.fl_server.launch import loopback
from fedmoe.model.trainable import TrainableView
from fedmoe.protocol.config import PINS_FILE, JobConfig

pytestmark = [pytest.mark.slow, pytest.mark.federation]

ROOT = Path(__file__).resolve().parents[2]
BANKS = ["bank-0", "bank-1", "bank-2", "bank-3"]
HONEST = BANKS[:3]
POISONER = "bank-3"


def revealing_policy(tmp_path: Path) -> str:
    text = (ROOT / "deploy" / "demo-bank-policy.toml").read_text()
    assert "reveal-on-quarantine = false" in text
    path = tmp_path / "revealing-policy.toml"
    # + keep-plaintext-deltas: the test compares the aggregate with the banks' kept deltas
    path.write_text(text.replace("reveal-on-quarantine = false", "reveal-on-quarantine = true") + KEEP_DELTAS_LINE)
    return str(path)


def test_a_poisoner_is_named_excluded_and_the_next_round_aggregates_the_others(tmp_path, monkeypatch):
    job_id = "accountable"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HOSTILE), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FEDMOE_HOSTILE_BANK", POISONER)
    monkeypatch.setenv("FEDMOE_HOSTILE_FACTOR", repr(FACTOR))
    monkeypatch.setenv("FEDMOE_HOSTILE_ROUNDS", "2")
    config = run_config(
        tmp_path,
        job_id,
        **{"num-rounds": 3, "min-banks": 3, "synthetic-banks": 4, "update-rule": "mean"},
    )
    server_dir = tmp_path / "server" / job_id
    policy = revealing_policy(tmp_path)
    before: dict[str, dict[str, torch.Tensor]] = {}
    with loopback(4, tmp_path, base_port=free_port_block(), policy_files=dict.fromkeys(BANKS, policy)) as deployment:
        submit = deployment.flwr_run(config, timeout=120, stream=False)
        assert submit.returncode == 0, submit.stdout
        for bank in HONEST:  # the global model after round 1, the last one applied before round 3's
            state_file = bank_dir(tmp_path, bank, job_id) / "state.json"
            wait_for(lambda f=state_file: read_json(f).get("applied_round") == 1, 900, f"{bank} to apply round 1")
            before[bank] = load_tensors(bank_dir(tmp_path, bank, job_id) / "replica.safetensors")
        wait_for(lambda: (server_dir / "results.json").exists(), 900, "the job to finish")

    state = read_json(server_dir / "state.json")
    r1, r2, r3 = state["rounds"]
    assert r1["aggregated"] and r1["participants"] == BANKS, r1
    assert r2["participants"] == BANKS and not r2["aggregated"] and "above the bound" in r2["quarantine_reason"]
    # round 3: round 2 quarantined, bank-3 named by the verdicts, the round aggregated without it
    assert r3["quarantined"] == [2], r3
    assert list(r3["named"]) == [POISONER], r3["named"]
    finding = r3["named"][POISONER]
    print(f"\nfinding: {finding}\nend reason: {state['end_reason']}")
    assert finding.startswith("named poisoner of round 2 by bank-0, bank-1, bank-2"), finding
    assert "above the bound" in finding
    assert r3["aggregated"] and r3["participants"] == HONEST, r3
    assert r3["outcomes"][POISONER] == "named a poisoner" and r3["left_out"][POISONER].endswith(finding)
    assert state["excluded"] == {POISONER: finding}
    assert state["end_reason"].endswith("rounds without an aggregate (too few banks or quarantined): [2]")

    # the server's ledger mirror names it, with the finding, and so does the officer's audit
    mirror = (server_dir / "ledger-mirror" / f"{POISONER}.jsonl").read_text()
    assert "named poisoner of round 2" in mirror
    ledgers = [*tmp_path.glob("banks/*/privacy/*/ledger.jsonl"), *(server_dir / "ledger-mirror").glob("*.jsonl")]
    audit = audit_ledgers(ledgers, pins=load_pins(tmp_path / "keys" / PINS_FILE))
    named = [f for f in audit.findings if f.check == "named-poisoner"]
    assert [(f.bank_id, f.round) for f in named] == [(POISONER, 3)], audit.findings
    assert finding in named[0].message and not audit.errors, audit.errors

    # the evidence kept for the auditor re-checks: with the BFV key, the reveals open bank-3's input
    kept = server_dir / "accountability" / "round-0002"
    summary = json.loads((kept / "summary.json").read_text())
    assert summary["named"] == {POISONER: finding} and summary["judges"] == BANKS
    evidence = QuarantineEvidence.from_bytes((kept / "evidence.bin").read_bytes())
    reveals = [RoundReveal.from_bytes(p.read_bytes()) for p in sorted(kept.glob("reveal-*.bin"))]
    key = load_bfv_secret(tmp_path / "keys" / BFV_SECRET_FILE)
    pins = load_pins(tmp_path / "keys" / PINS_FILE)
    bound = 1.0  # far above any honest coordinate of this tiny job, far below 1e6 x one
    accused, masked = name_poisoners(
        evidence, reveals, key, pins, lambda u: "out" if float(np.abs(u).max()) > bound else None
    )
    assert [a.bank_id for a in accused] == [POISONER] and masked == []
    for bank in BANKS:  # each verdict is signed by its bank and accuses bank-3 alone
        verdict = Verdict.from_bytes((kept / f"verdict-{bank}.bin").read_bytes())
        pins.verify(bank, verdict.signed_bytes(), verdict.signature)
        assert [a.bank_id for a in verdict.accused] == [POISONER]

    # the honest banks' replicas after round 3: the round-1 model plus the plain mean of their
    # three round-3 updates (update-rule mean), within the quantization bound; bit-identical
    step = 1.0 / SecAggParams().scale
    deltas = [
        load_tensors(bank_dir(tmp_path, b, job_id) / "deltas" / "round-0003.safetensors")["delta"].double().numpy()
        for b in HONEST
    ]
    mean = np.mean(deltas, axis=0)
    order = list(TrainableView(build_model(JobConfig.from_run_config(config))).params)  # the delta's layout
    after = {b: load_tensors(bank_dir(tmp_path, b, job_id) / "replica.safetensors") for b in HONEST}
    for bank in HONEST:
        assert replica_round(bank_dir(tmp_path, bank, job_id) / "replica.safetensors") == 3
        moved = np.concatenate([(after[bank][k].double() - before[bank][k].double()).flatten().numpy() for k in order])
        assert moved.shape == mean.shape and np.abs(mean).max() > 1e-4  # the banks really moved
        assert np.abs(moved - mean).max() <= step + 1e-6, bank
    assert all(torch.equal(after["bank-0"][k], after[b][k]) for b in HONEST for k in after["bank-0"])
