"""Hostile parties over a real loopback federation (SuperLink, SuperNodes, executors, DP-SGD, secagg).

The loopback versions of two attacks of test_hostile_rounds.py (which runs them in-process), with
secure aggregation, the default:

- a poisoned contribution: bank-2 is hostile. tests/fl_server/hostile/sitecustomize.py, first on
  PYTHONPATH of the Flower processes, patches its `SecAggSealer.seal` (production code unchanged)
  so that in round 2 it masks its delta x 1e6; its masked input is otherwise valid (signed, weight
  1), so it enters the sum. Every honest bank rejects that aggregate in round 3 and its replica
  stays bit-identical; the server quarantines round 2 and the job's end reason says so.
- impersonation: a fourth SuperNode ("mallory") whose node-config says bank-id 'bank-0' but which
  holds no bank-0 identity key (its own key folder: the job's keys, a fresh Ed25519 key named
  bank-0 and pins that pin it). Its identify reply, signed as bank-0, is refused and recorded
  against its node; bank-0's mirror holds only bank-0's own entries and bank-0 passes the audit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from local_grid import KEEP_DELTAS_POLICY
from safetensors import safe_open
from test_federation_e2e import free_port_block, wait_for  # the shared loopback helpers

from fedmoe.crypto.identity import ConsortiumPins, generate_identity, load_identity, load_pins, write_pins
from fedmoe.crypto.keys import SECRET_FILE as CKKS_SECRET_FILE
from fedmoe.crypto.secagg.bank import open_aggregate
from fedmoe.crypto.secagg.bfv import SECRET_FILE as BFV_SECRET_FILE
from fedmoe.crypto.secagg.bfv_secret import load_bfv_secret
from fedmoe.crypto.secagg.messages import RoundSetup, SecureAggregate
from fedmoe.fl_client.state import load_tensors
from fedmoe.fl_server.deploy import BankNode, service_commands
from fedmoe.fl_server.launch import job_paths, loopback, wait_for_port
from fedmoe.protocol.config import PINS_FILE, identity_file_name
from fedmoe.protocol.messages import unpack_secagg_result

pytestmark = [pytest.mark.slow, pytest.mark.federation]

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = Path(__file__).resolve().parent / "hostile"  # its sitecustomize.py makes bank-2 hostile
BANKS = ["bank-0", "bank-1", "bank-2"]
FACTOR = 1e6


def run_config(tmp_path: Path, job_id: str, **overrides: object) -> dict[str, object]:
    return {
        **job_paths(tmp_path),
        "job-id": job_id,
        "aggregation": "secagg",
        "model-preset": "tiny",
        "local-steps": 2,
        "records-per-bank": 160,
        "synthetic-banks": 3,
        "seq-len": 32,
        "dp": True,
        "evaluate": False,
        "round-timeout": 300.0,  # a loaded 2-core host trains 3 banks at once
        **overrides,
    }


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def bank_dir(tmp_path: Path, bank: str, job_id: str) -> Path:
    return tmp_path / "banks" / bank / "jobs" / job_id


def replica_round(path: Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int((handle.metadata() or {})["applied_round"])


def test_a_poisoned_masked_input_is_applied_by_no_honest_bank_and_its_round_is_quarantined(tmp_path, monkeypatch):
    job_id = "poison"
    attack_log = tmp_path / "hostile.jsonl"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HOSTILE), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FEDMOE_HOSTILE_BANK", "bank-2")
    monkeypatch.setenv("FEDMOE_HOSTILE_FACTOR", repr(FACTOR))
    monkeypatch.setenv("FEDMOE_HOSTILE_ROUNDS", "2")
    monkeypatch.setenv("FEDMOE_HOSTILE_LOG", str(attack_log))
    config = run_config(tmp_path, job_id, **{"num-rounds": 3, "min-banks": 2})
    server_dir = tmp_path / "server" / job_id
    before: dict[str, dict[str, torch.Tensor]] = {}
    policies = {f"bank-{i}": KEEP_DELTAS_POLICY for i in range(3)}  # the test reads the banks' kept deltas
    with loopback(3, tmp_path, base_port=free_port_block(), policy_files=policies) as deployment:
        submit = deployment.flwr_run(config, timeout=120, stream=False)
        assert submit.returncode == 0, submit.stdout
        # The global model before the poisoned aggregate: each bank's replica once it applied round 1
        # (at round 2's masked input). Nothing rewrites it before round 3, where the poisoned
        # aggregate of round 2 arrives.
        for bank in BANKS:
            state_file = bank_dir(tmp_path, bank, job_id) / "state.json"
            wait_for(lambda f=state_file: read_json(f).get("applied_round") == 1, 900, f"{bank} to apply round 1")
            replica = bank_dir(tmp_path, bank, job_id) / "replica.safetensors"
            assert replica_round(replica) == 1
            before[bank] = load_tensors(replica)
        wait_for(lambda: (server_dir / "results.json").exists(), 900, "the job to finish")

    # The attack happened: bank-2 (and only bank-2) poisoned round 2. Its ClientApp ran the app that
    # `flwr run` built from this checkout (installed under FLWR_HOME/apps), not another tree's.
    attacks = [json.loads(line) for line in attack_log.read_text().splitlines()]
    assert [(a["bank"], a["round"], a["factor"]) for a in attacks] == [("bank-2", 2, FACTOR)], attacks
    installed = Path(attacks[0]["fl_client"]).resolve().parent
    assert installed.is_relative_to((tmp_path / "flwr-home" / "apps").resolve()), installed
    for name in ("secagg_bank.py", "bank.py", "aggregate_check.py"):
        assert (installed / name).read_bytes() == (ROOT / "fedmoe" / "fl_client" / name).read_bytes(), name

    # The poisoned masked input was valid: round 2's sum holds d0 + d1 + 1e6 * d2 (BFV secret: test only).
    key = load_bfv_secret(tmp_path / "keys" / BFV_SECRET_FILE)
    pins = load_pins(tmp_path / "keys" / PINS_FILE)
    setup_bytes, aggregate_bytes = unpack_secagg_result((server_dir / "aggregates" / "round-0002.bundle").read_bytes())
    setup, aggregate = RoundSetup.from_bytes(setup_bytes), SecureAggregate.from_bytes(aggregate_bytes)
    mean, total = open_aggregate(aggregate, setup=setup, key=key, pins=pins, min_banks=2)
    deltas = {
        b: load_tensors(bank_dir(tmp_path, b, job_id) / "deltas" / "round-0002.safetensors")["delta"].double().numpy()
        for b in BANKS
    }  # what each bank trained (bank-2's before the poison)
    poisoned = (deltas["bank-0"] + deltas["bank-1"] + FACTOR * deltas["bank-2"]) / 3
    assert total == 3 and np.allclose(mean, poisoned, rtol=1e-5, atol=1e-5)

    state = read_json(server_dir / "state.json")
    r1, r2, r3 = state["rounds"]
    reasons = {
        "round 2 quarantine_reason": r2["quarantine_reason"],
        "round 2 no_aggregate": r2["no_aggregate"],
        "round 3 no_aggregate": r3["no_aggregate"],
        **{f"round 3 left_out[{b}]": r3["left_out"].get(b) for b in BANKS},
        "end_reason": state["end_reason"],
    }
    print("\nrecorded reasons:\n" + "\n".join(f"  {k}: {v}" for k, v in reasons.items()))
    assert r1["aggregated"] and r1["participants"] == BANKS, r1
    # round 2: bank-2's input was valid, so it was summed; the sum was quarantined afterwards
    assert r2["participants"] == BANKS and not r2["aggregated"], r2
    assert "above the bound" in r2["quarantine_reason"], r2["quarantine_reason"]
    assert r2["no_aggregate"] == f"aggregate quarantined: {r2['quarantine_reason']}"
    # round 3: every bank rejected the aggregate of round 2 (the reason names it), nothing was summed
    assert r3["quarantined"] == [2] and not r3["aggregated"] and r3["participants"] == [], r3
    assert r3["outcomes"] == dict.fromkeys(BANKS, "rejected an aggregate"), r3["outcomes"]
    for bank in BANKS:
        why = r3["left_out"][bank]
        assert why.startswith("rejected an aggregate: aggregate of round 2 rejected: largest |coordinate|"), why
        assert "above the bound" in why, why
    # the job does not claim a clean run: it names the rounds without an aggregate
    assert state["finished"] and state["end_reason"] != "completed 3 rounds"
    assert state["end_reason"].endswith("rounds without an aggregate (too few banks or quarantined): [2, 3]")
    results = read_json(server_dir / "results.json")["state"]
    assert results["end_reason"] == state["end_reason"]
    assert [r["aggregated"] for r in results["rounds"]] == [True, False, False]

    # every bank's replica is bit-identical to the one before the poisoned aggregate (round 1 applied)
    for bank in BANKS:
        directory = bank_dir(tmp_path, bank, job_id)
        assert read_json(directory / "state.json")["applied_round"] == 1
        assert read_json(directory / "state.json")["rounds_trained"] == [1, 2]
        after = load_tensors(directory / "replica.safetensors")
        assert replica_round(directory / "replica.safetensors") == 1
        assert after.keys() == before[bank].keys()
        assert all(torch.equal(after[k], before[bank][k]) for k in after), bank  # bit-identical values
        assert all(torch.isfinite(v).all() for v in after.values())
    # and all three replicas are the same global model (the same aggregate of round 1 was applied)
    assert all(torch.equal(before["bank-0"][k], before[b][k]) for b in BANKS for k in before["bank-0"])


def impostor_key_folder(keys: Path, folder: Path) -> None:
    """What mallory holds: the job's keys (an insider's copy), but no bank-0 identity key: a fresh
    Ed25519 key named bank-0, and a pins file of its own that pins it (so its ClientApp signs)."""
    folder.mkdir(parents=True)
    for name in (CKKS_SECRET_FILE, BFV_SECRET_FILE):
        shutil.copy2(keys / name, folder / name)
    forged = generate_identity(folder / identity_file_name("bank-0"), "bank-0")
    others = [load_identity(keys / identity_file_name(b)) for b in ("bank-1", "bank-2")]
    write_pins(folder / PINS_FILE, ConsortiumPins.from_identities([forged, *others]))
    assert forged.public_key != load_identity(keys / identity_file_name("bank-0")).public_key


def test_an_impersonating_node_is_refused_recorded_against_its_node_and_never_enters_bank0s_mirror(tmp_path):
    job_id = "impostor"
    config = run_config(tmp_path, job_id, **{"num-rounds": 1, "min-banks": 3})
    server_dir = tmp_path / "server" / job_id
    base = free_port_block()
    with loopback(3, tmp_path, base_port=base) as deployment:
        mallory_keys = tmp_path / "mallory" / "keys"
        impostor_key_folder(tmp_path / "keys", mallory_keys)
        impostor = BankNode(
            bank_id="bank-0",  # claims to be bank-0
            partition_id=0,
            state_dir=str(tmp_path / "mallory" / "state"),
            key_path=str(mallory_keys / CKKS_SECRET_FILE),
            torch_threads=1,
        )
        port = base + 103
        topology = dataclasses.replace(
            deployment.topology,
            banks=(impostor,),
            supernode_hosts=("127.0.0.1",),
            supernode_binds=("127.0.0.1",),
            supernode_ports=(port,),
            health_ports={"bank-0": base + 250, "bank-0-apps": base + 251},
        )
        commands = service_commands(topology)
        process = deployment.start_service("mallory", commands["bank-0"])
        wait_for_port("127.0.0.1", port, 60, process)
        deployment.start_service("mallory-apps", commands["bank-0-apps"])
        log = deployment.log_dir / "mallory.log"
        wait_for(lambda: "SuperNode ID:" in log.read_text(errors="replace"), 120, "mallory to register")
        mallory_node = int(re.search(r"SuperNode ID: (\d+)", log.read_text(errors="replace")).group(1))
        result = deployment.flwr_run(config, timeout=900, stream=False)
        assert result.returncode == 0, result.stdout
        wait_for(lambda: (server_dir / "results.json").exists(), 900, "the job to finish")

    state = read_json(server_dir / "state.json")
    [record] = state["rounds"]
    assert sorted(state["node_bank"].values()) == BANKS and str(mallory_node) not in state["node_bank"]
    mallory = f"node-{mallory_node}"  # the reply is recorded against the node that sent it
    assert [who for who in record["outcomes"] if who.startswith("node-")] == [mallory], record["outcomes"]
    print(f"\nrecorded against {mallory}: {record['left_out'][mallory]}")
    assert record["aggregated"] and record["participants"] == BANKS, record
    assert record["outcomes"][mallory] == "invalid reply"
    assert record["left_out"][mallory] == (
        "invalid reply: identify: claims 'bank-0': bank 'bank-0': signature does not verify under its pinned key "
        "(signature)"
    )
    assert state["end_reason"] == "completed 1 rounds"
    # the server's mirror: one file per real bank, bank-0's holds bank-0's own round-1 entry only
    mirror = server_dir / "ledger-mirror"
    assert sorted(p.name for p in mirror.iterdir() if p.suffix == ".jsonl") == [f"{b}.jsonl" for b in BANKS]
    entries = [json.loads(line) for line in (mirror / "bank-0.jsonl").read_text().splitlines()]
    assert [(e["round"], e["bank_id"]) for e in entries] == [(1, "bank-0")], entries
    # mallory trained nothing and wrote no ledger
    assert not list((tmp_path / "mallory" / "state").glob("privacy/*/ledger.jsonl"))
    # the privacy officer's audit passes for the honest bank-0 (its ledger + the server's mirror)
    [ledger] = (tmp_path / "banks" / "bank-0").glob("privacy/*/ledger.jsonl")
    audit = subprocess.run(
        [sys.executable, "-m", "fedmoe.audit", "--out", str(tmp_path / "audit"),
         "--pins", str(tmp_path / "keys" / PINS_FILE), "--bank", "bank-0", str(ledger), str(mirror / "bank-0.jsonl")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
