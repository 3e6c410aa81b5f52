"""Rounds that one bad bank or one crash cannot break (in-process: real ClientApp, ciphertexts, ledgers).

Each test is a finding of the hostile-parties review; on the old code each of them failed:
a poisoned aggregate was applied by every bank, an impersonator's reply was taken for bank-0's,
a server restart made every bank train a round twice, a bank's data error sent a whole record
to the server, and a bank that could not afford one step was re-selected every round.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from local_grid import LocalGrid

from fedmoe.audit import audit_ledgers
from fedmoe.crypto import keygen, load_secret_context
from fedmoe.crypto.keys import SECRET_FILE
from fedmoe.crypto.packing import decrypt_bundle, encrypt_update
from fedmoe.fl_server.console import SilentReporter
from fedmoe.fl_server.federation import Federation
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.messages import TrainReply

CARD = "4111111111111111"


def run_config(tmp_path: Path, **overrides) -> dict:
    config = {
        "job-id": "hostile",
        "aggregation": "ckks",  # forged bundles below are CKKS (under secagg see test_secagg_rounds.py)
        "num-rounds": 2,
        "min-banks": 2,
        "model-preset": "tiny",
        "local-steps": 2,
        "records-per-bank": 160,
        "seq-len": 32,
        "evaluate": False,
        "key-dir": str(tmp_path / "keys"),
        "server-state-dir": str(tmp_path / "server"),
        "bank-state-root": str(tmp_path / "banks"),
    }
    return config | overrides


def banks(n: int) -> dict[int, dict]:
    return {100 + i: {"bank-id": f"bank-{i}", "partition-id": i} for i in range(n)}


def replica(tmp_path: Path, bank: str, job: str = "hostile") -> dict:
    from fedmoe.fl_client.state import load_tensors

    return load_tensors(tmp_path / "banks" / bank / "jobs" / job / "replica.safetensors")


class TamperingGrid(LocalGrid):
    """Delivers to the real ClientApps; `tamper(group, request, reply)` may rewrite a bank's reply."""

    def __init__(self, node_configs, run_config, tamper=None, crash_after=None) -> None:
        super().__init__(node_configs, run_config)
        self.tamper, self.crash_after, self.snapshots = tamper, crash_after, {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        group = messages[0].metadata.group_id if messages else ""
        if self.crash_after and group.endswith(self.crash_after):
            raise KeyboardInterrupt("server killed after the banks answered")  # like a SIGKILL mid-round
        if self.tamper is not None:
            replies = [self.tamper(group, m, r) for m, r in zip(messages, replies, strict=True)]
        return replies


def scaled_bundle(request, reply, tmp_path: Path, factor: float, weight: float = 1.0):
    """What a malicious bank (it holds the shared key) can send: its own update, scaled."""
    from flwr.app import Message

    tr = TrainReply.from_content(reply.content)
    key = load_secret_context(tmp_path / "keys" / SECRET_FILE)
    header, values = decrypt_bundle(tr.bundle, key)  # [w * delta..., w]
    forged = encrypt_update(
        np.asarray(values[:-1], dtype=np.float32) * factor, weight=weight, key=key, round=tr.round,
        layout_hash=header.layout_hash, bank_id=tr.bank_id,
    )  # fmt: skip
    content = TrainReply(**{**tr.__dict__, "bundle": forged}).to_content()
    return Message(content=content, reply_to=request)


@pytest.fixture()
def keys(tmp_path):
    keygen(tmp_path / "keys")


@pytest.mark.slow
@pytest.mark.parametrize("factor,weight", [(1e6, 1.0), (1.0, 1e6)])  # values x1e6; a forged weight slot
def test_a_poisoned_aggregate_is_applied_by_no_honest_bank_and_quarantined(tmp_path, keys, factor, weight):
    config = run_config(tmp_path, **{"num-rounds": 3})

    def poison(group, request, reply):
        if group.endswith("-r2") and request.metadata.dst_node_id == 102 and not reply.has_error():
            return scaled_bundle(request, reply, tmp_path, factor, weight)
        return reply

    grid = TamperingGrid(banks(3), config, tamper=poison)
    federation = Federation(grid=grid, job=JobConfig.from_run_config(config), reporter=SilentReporter())
    before = {}
    original_round = federation.run_round

    def run_round(round_idx, nodes):
        if round_idx == 3:  # the banks' replicas after applying round 1 (the last good aggregate)
            before.update({b: replica(tmp_path, b) for b in ("bank-0", "bank-1", "bank-2")})
        return original_round(round_idx, nodes)

    federation.run_round = run_round
    state = federation.run()
    r1, r2, r3 = state.rounds
    assert r1.aggregated and not r2.aggregated and r2.quarantine_reason
    assert r3.quarantined == [2] and not r3.aggregated
    assert set(r3.outcomes.values()) == {"rejected an aggregate"}
    why = r2.quarantine_reason
    assert ("above the bound" in why) if factor > 1 else ("total weight" in why), why
    # every honest bank's model is bit-identical to before the poisoned aggregate arrived
    for bank in ("bank-0", "bank-1"):
        after = replica(tmp_path, bank)
        assert after.keys() == before[bank].keys()
        assert all(torch.equal(after[k], before[bank][k]) for k in after), bank  # bit-identical values
    # the quarantined aggregate is never sent again, and the job does not claim success
    assert 2 not in federation.store.aggregates_after(state, 0)
    assert "rounds without an aggregate" in state.end_reason


@pytest.mark.slow
def test_an_impersonating_node_is_recorded_against_its_node_and_never_enters_bank0s_mirror(tmp_path, keys):
    config = run_config(tmp_path, **{"num-rounds": 1})
    nodes = banks(3)
    nodes[103] = {"bank-id": "bank-0", "partition-id": 0, "state-dir": str(tmp_path / "mallory")}
    grid = LocalGrid(nodes, config)
    state = Federation(grid=grid, job=JobConfig.from_run_config(config), reporter=SilentReporter()).run()
    [record] = state.rounds
    assert record.participants == ["bank-0", "bank-1", "bank-2"]
    assert record.outcomes["node-103"] == "invalid reply"
    assert "'bank-0' is node 100, which is connected; node 103 claims to be it" in record.left_out["node-103"]
    mirror = tmp_path / "server" / "hostile" / "ledger-mirror"
    assert [json.loads(line)["round"] for line in (mirror / "bank-0.jsonl").read_text().splitlines()] == [1]
    ledgers = list((tmp_path / "banks" / "bank-0").glob("privacy/*/ledger.jsonl"))
    result = audit_ledgers([*ledgers, mirror / "bank-0.jsonl"])
    assert result.ok, [str(f) for f in result.findings]  # the honest bank-0 passes its audit


@pytest.mark.slow
def test_a_server_restart_mid_round_costs_no_bank_a_second_round_of_privacy(tmp_path, keys):
    config = run_config(tmp_path)
    job = JobConfig.from_run_config(config)
    crashing = TamperingGrid(banks(2), config, crash_after="-r2")
    with pytest.raises(KeyboardInterrupt):
        Federation(grid=crashing, job=job, reporter=SilentReporter()).run()
    state = Federation(grid=LocalGrid(banks(2), config), job=job, reporter=SilentReporter()).run()
    assert state.completed_round == 2 and all(r.aggregated for r in state.rounds)
    for bank in ("bank-0", "bank-1"):
        [ledger] = (tmp_path / "banks" / bank).glob("privacy/*/ledger.jsonl")
        entries = [json.loads(line) for line in ledger.read_text().splitlines()]
        assert [(e["round"], e["status"]) for e in entries] == [(1, "trained"), (2, "trained")]
        # and the final aggregate reached the bank although evaluate=false (the closing message)
        bank_state = json.loads((tmp_path / "banks" / bank / "jobs" / "hostile" / "state.json").read_text())
        assert bank_state["applied_round"] == 2 and bank_state["rounds_trained"] == [1, 2]


@pytest.mark.slow
def test_a_data_error_never_sends_a_record_or_a_local_path_to_the_server(tmp_path, keys):
    csv = tmp_path / "private" / "bank-2.csv"
    csv.parent.mkdir()
    csv.write_text(f"{CARD},Jane Doe,DE89370400440532013000,12.50\n" * 3, encoding="utf-8")  # no header row
    nodes = banks(3)
    nodes[102]["data-path"] = str(csv)
    config = run_config(tmp_path, **{"num-rounds": 1})
    state = Federation(
        grid=LocalGrid(nodes, config), job=JobConfig.from_run_config(config), reporter=SilentReporter()
    ).run()
    reason = state.rounds[0].left_out["node-102"]  # it failed before it could say which bank it is
    assert reason.startswith("client error") and "DataError in" in reason, reason
    server_text = "".join(p.read_text(errors="replace") for p in (tmp_path / "server").rglob("*") if p.is_file())
    for secret in (CARD, "Jane Doe", "DE89370400440532013000", str(csv.parent), SECRET_FILE):
        assert secret not in server_text


@pytest.mark.slow
def test_a_bank_that_cannot_afford_one_step_is_exhausted_not_reselected(tmp_path, keys):
    small = tmp_path / "bank-2.jsonl"  # 5 records, batch 16: q > 1, no DP-SGD step is possible
    small.write_text("".join(json.dumps({"text": f"payment {i}"}) + "\n" for i in range(5)), encoding="utf-8")
    nodes = banks(3)
    nodes[102]["data-path"] = str(small)
    config = run_config(tmp_path)
    state = Federation(
        grid=LocalGrid(nodes, config), job=JobConfig.from_run_config(config), reporter=SilentReporter()
    ).run()
    r1, r2 = state.rounds
    assert r1.outcomes["bank-2"] == "refused" and "cannot train within the budget" in r1.left_out["bank-2"]
    assert r2.outcomes["bank-2"] == "not selected" and "bank-2" in state.exhausted
    [ledger] = (tmp_path / "banks" / "bank-2").glob("privacy/*/ledger.jsonl")
    result = audit_ledgers([ledger])  # the refusal is on the bank's record, so the audit shows it
    assert result.ok and result.banks[0].rounds_refused == (1,)


@pytest.mark.slow
def test_a_poisoned_last_round_is_quarantined_at_the_closing_message(tmp_path, keys):
    """The last aggregate reaches the banks only in the closing message: a rejection there counts too."""
    config = run_config(tmp_path)  # 2 rounds: bank-2 poisons the last one

    def poison(group, request, reply):
        train = request.metadata.message_type == "train"  # (the closing message is in the same group)
        if train and group.endswith("-r2") and request.metadata.dst_node_id == 102 and not reply.has_error():
            return scaled_bundle(request, reply, tmp_path, 1e6)
        return reply

    grid = TamperingGrid(banks(3), config, tamper=poison)
    state = Federation(grid=grid, job=JobConfig.from_run_config(config), reporter=SilentReporter()).run()
    r1, r2 = state.rounds
    assert r1.aggregated and not r2.aggregated and "above the bound" in r2.quarantine_reason
    assert r2.quarantined == [2] and "quarantined by the banks at the closing message" in state.end_reason
    for bank in ("bank-0", "bank-1", "bank-2"):  # nobody applied it
        bank_state = json.loads((tmp_path / "banks" / bank / "jobs" / "hostile" / "state.json").read_text())
        assert bank_state["applied_round"] == 1, bank


@pytest.mark.slow
def test_the_closing_message_goes_to_bound_nodes_only_and_never_rebinds_a_bank(tmp_path, keys):
    """An unsigned closing reply once moved bank-0 to whichever node answered as bank-0 while bank-0's
    own node was away, locking the real bank-0 out afterwards."""
    config = run_config(tmp_path, **{"num-rounds": 1})
    nodes = banks(3)
    nodes[103] = {"bank-id": "bank-0", "partition-id": 0, "state-dir": str(tmp_path / "mallory")}
    grid = LocalGrid(nodes, config)
    federation = Federation(grid=grid, job=JobConfig.from_run_config(config), reporter=SilentReporter())
    federation.run()
    del grid.node_configs[100]  # bank-0's SuperNode is away; mallory (node 103) is still connected
    federation.close([101, 102, 103], 1)
    assert federation.node_bank == {100: "bank-0", 101: "bank-1", 102: "bank-2"}
    assert not [d for d in grid.delivered if d[0] == 103 and d[1] == "evaluate"]
