"""Secure aggregation as the federation's round (in-process: real ClientApps, DP-SGD, BFV ciphertexts).

The server drives the five secagg stages over LocalGrid; the banks train once per round at the
masked-input stage. What could fail: the decrypted aggregate must equal the plaintext mean of the
deltas the banks kept (within the fixed-point bound), banks that drop before or after their masked
input must not stop a round, too few survivors must abort it with nothing applied, and a node
that cannot sign as the bank it claims to be must never be bound to it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from local_grid import KEEP_DELTAS_POLICY, LocalGrid

from fedmoe.crypto.identity import ConsortiumPins, generate_identity, load_identity, load_pins, write_pins
from fedmoe.crypto.secagg.bank import open_aggregate
from fedmoe.crypto.secagg.bfv import SECRET_FILE as BFV_SECRET_FILE
from fedmoe.crypto.secagg.bfv_secret import load_bfv_secret
from fedmoe.crypto.secagg.messages import RoundSetup, SecureAggregate
from fedmoe.fl_client.state import load_tensors
from fedmoe.fl_server import federation as federation_module
from fedmoe.fl_server.ceremony import loopback_ceremony
from fedmoe.fl_server.console import SilentReporter
from fedmoe.fl_server.federation import Federation
from fedmoe.protocol.config import PINS_FILE, JobConfig, identity_file_name
from fedmoe.protocol.messages import RoundRequest, SecAggStage, TrainReply, unpack_secagg_result

pytestmark = [pytest.mark.slow, pytest.mark.federation]

JOB = "secagg"
QUANTUM = 2.0**-20  # fixed-point step of w * delta (SecAggParams.scale_bits = 20)


def run_config(tmp_path: Path, **overrides) -> dict:
    config = {
        "job-id": JOB,
        "aggregation": "secagg",
        "num-rounds": 2,
        "min-banks": 2,
        "model-preset": "tiny",
        "local-steps": 2,
        "records-per-bank": 160,
        "synthetic-banks": 5,
        "seq-len": 32,
        "evaluate": False,
        "round-timeout": 1.0,  # in-process replies are immediate: this is how long a dropped bank costs
        "key-dir": str(tmp_path / "keys"),
        "server-state-dir": str(tmp_path / "server"),
        "bank-state-root": str(tmp_path / "banks"),
    }
    return config | overrides


def banks(n: int) -> dict[int, dict]:
    return {100 + i: {"bank-id": f"bank-{i}", "partition-id": i, "policy-file": KEEP_DELTAS_POLICY} for i in range(n)}


@pytest.fixture()
def keys(tmp_path):
    loopback_ceremony(tmp_path / "keys", [f"bank-{i}" for i in range(5)])


class DroppingGrid(LocalGrid):
    """LocalGrid whose banks go silent: `drops[(round, node)]` = the first stage they miss (and all later ones)."""

    ORDER = list(SecAggStage)

    def __init__(self, node_configs, run_config, drops: dict[tuple[int, int], SecAggStage]) -> None:
        super().__init__(node_configs, run_config)
        self.drops = drops

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:  # a push gives every message its id, delivered or not
            msg.metadata.__dict__["_message_id"] = msg.object_id
        kept = [m for m in messages if not self.silent(m)]
        return super().send_and_receive(kept, timeout=timeout)

    def silent(self, msg) -> bool:
        kind = msg.metadata.message_type.removeprefix("train.secagg_")
        round_idx = int(msg.metadata.group_id.rsplit("-r", 1)[1])
        first = self.drops.get((round_idx, msg.metadata.dst_node_id))
        if first is None or kind not in {s.value for s in SecAggStage}:
            return False
        return self.ORDER.index(SecAggStage(kind)) >= self.ORDER.index(first)


def run_job(tmp_path: Path, grid: LocalGrid, config: dict):
    federation = Federation(grid=grid, job=JobConfig.from_run_config(config), reporter=SilentReporter())
    return federation.run()


def open_round(tmp_path: Path, round_idx: int) -> tuple[np.ndarray, float, SecureAggregate]:
    """What a bank does with the stored aggregate: check the signed contributors, decrypt the mean."""
    blob = (tmp_path / "server" / JOB / "aggregates" / f"round-{round_idx:04d}.bundle").read_bytes()
    setup_bytes, aggregate_bytes = unpack_secagg_result(blob)
    setup, aggregate = RoundSetup.from_bytes(setup_bytes), SecureAggregate.from_bytes(aggregate_bytes)
    key = load_bfv_secret(tmp_path / "keys" / BFV_SECRET_FILE)
    pins = load_pins(tmp_path / "keys" / PINS_FILE)
    mean, total = open_aggregate(aggregate, setup=setup, key=key, pins=pins, min_banks=2)
    return mean, total, aggregate


def kept_delta(tmp_path: Path, bank: str, round_idx: int) -> np.ndarray:
    path = tmp_path / "banks" / bank / "jobs" / JOB / "deltas" / f"round-{round_idx:04d}.safetensors"
    return load_tensors(path)["delta"].double().numpy()


def assert_mean_of_kept_deltas(tmp_path: Path, round_idx: int, contributors: list[str]) -> None:
    mean, total, aggregate = open_round(tmp_path, round_idx)
    assert list(aggregate.contributors) == contributors
    assert total == len(contributors)  # weight 1 per bank, exact
    plain = sum(kept_delta(tmp_path, b, round_idx) for b in contributors) / len(contributors)
    assert np.abs(plain).max() > 1e-4  # the banks really moved
    # each bank rounds its w * delta to 2^-20: the mean is off by at most 2^-21 per coordinate
    assert np.abs(mean - plain).max() <= QUANTUM / 2 + 1e-9


def bank_state(tmp_path: Path, bank: str) -> dict:
    return json.loads((tmp_path / "banks" / bank / "jobs" / JOB / "state.json").read_text())


def ledger_rounds(tmp_path: Path, bank: str) -> list[tuple[int, str]]:
    [ledger] = (tmp_path / "banks" / bank).glob("privacy/*/ledger.jsonl")
    return [(e["round"], e["status"]) for e in map(json.loads, ledger.read_text().splitlines())]


def impostor(tmp_path: Path) -> dict:
    """A node that claims to be bank-0 with a key of its own (pinned only in its own pins file)."""
    folder = tmp_path / "mallory-keys"
    folder.mkdir()
    shutil.copy(tmp_path / "keys" / BFV_SECRET_FILE, folder / BFV_SECRET_FILE)
    (folder / BFV_SECRET_FILE).chmod(0o600)
    fake = generate_identity(folder / identity_file_name("bank-0"), "bank-0")
    real = load_pins(tmp_path / "keys" / PINS_FILE)
    write_pins(folder / PINS_FILE, ConsortiumPins({**real.keys, "bank-0": fake.public_key}))
    return {
        "bank-id": "bank-0",
        "partition-id": 0,
        "key-path": str(folder / "context.secret.ckks"),
        "state-dir": str(tmp_path / "mallory"),
    }


def test_four_banks_aggregate_is_the_mean_of_their_deltas_and_an_impostor_is_never_bound(tmp_path, keys):
    config = run_config(tmp_path)
    nodes = banks(4) | {104: impostor(tmp_path)}
    grid = LocalGrid(nodes, config)
    state = run_job(tmp_path, grid, config)
    four = ["bank-0", "bank-1", "bank-2", "bank-3"]
    assert state.finished and [r.participants for r in state.rounds] == [four, four]
    assert all(r.aggregated for r in state.rounds)
    for round_idx in (1, 2):
        assert_mean_of_kept_deltas(tmp_path, round_idx, four)
    # the impostor's signature does not verify under bank-0's pinned key: never bound, never a participant
    r1 = state.rounds[0]
    assert r1.outcomes["node-104"] == "invalid reply" and "signature" in r1.left_out["node-104"]
    assert "104" not in state.node_bank and state.node_bank["100"] == "bank-0"
    assert not any(node == 104 and "advertise" in kind for node, kind, _ in grid.delivered)
    # round 2's keys were advertised with round 1's masked inputs and shared with its unmask orders,
    # and nobody dropped (no consent exchange): round 2 was two exchanges
    exchanges = {
        (kind.removeprefix("train.secagg_"), group)
        for node, kind, group in grid.delivered
        if node != 104 and kind.startswith("train.secagg_")
    }
    assert sorted(kind for kind, group in exchanges if group == f"{JOB}-r2") == ["masked_input", "unmask"]
    assert {"secagg-advertise-ahead", "secagg-share_keys-ahead"} <= set(state.rounds[1].seconds)
    assert ("advertise", f"{JOB}-r1") in exchanges and ("consent", f"{JOB}-r1") not in exchanges
    for bank in four:  # trained once per round; the last aggregate reached every bank (closing message)
        assert ledger_rounds(tmp_path, bank) == [(1, "trained"), (2, "trained")]
        assert bank_state(tmp_path, bank)["applied_round"] == 2
        assert not list((tmp_path / "banks" / bank / "jobs" / JOB / "secagg").glob("*.json"))  # secrets gone
    # replicas agree bit for bit (every bank applied the same decrypted aggregates)
    replicas = [load_tensors(tmp_path / "banks" / b / "jobs" / JOB / "replica.safetensors") for b in four]
    assert all(all(np.array_equal(r[k].numpy(), replicas[0][k].numpy()) for k in r) for r in replicas[1:])
    # the server's state holds no plaintext delta and no secret key
    server_bytes = b"".join(p.read_bytes() for p in (tmp_path / "server").rglob("*") if p.is_file())
    for bank in four:
        assert kept_delta(tmp_path, bank, 1).astype(np.float32)[:32].tobytes() not in server_bytes
    assert load_identity(tmp_path / "keys" / identity_file_name("bank-0")).public_key not in server_bytes


def test_banks_dropping_before_and_after_their_masked_input_are_survived(tmp_path, keys):
    config = run_config(tmp_path)
    drops = {(1, 103): SecAggStage.MASKED_INPUT, (2, 102): SecAggStage.UNMASK}
    grid = DroppingGrid(banks(4), config, drops)
    state = run_job(tmp_path, grid, config)
    r1, r2 = state.rounds
    assert r1.aggregated and r2.aggregated
    # round 1: bank-3 shared its keys, then went silent: its pairwise masks were removed, it is not in the sum
    assert r1.participants == ["bank-0", "bank-1", "bank-2"]
    # it said ready at the pre-flight (with its keys), then fell silent: a crash, named as such (issue 27)
    assert r1.outcomes["bank-3"] == "crashed after ready" and "masked_input" in r1.left_out["bank-3"]
    assert "said ready at the pre-flight, then no reply" in r1.left_out["bank-3"]
    assert_mean_of_kept_deltas(tmp_path, 1, ["bank-0", "bank-1", "bank-2"])
    assert (1, "trained") not in ledger_rounds(tmp_path, "bank-3")  # it never trained round 1
    # a bank dropped before unmasking: the survivors consented to the view before any share went out
    consented = {group for _, kind, group in grid.delivered if kind == SecAggStage.CONSENT.message_type}
    assert consented == {f"{JOB}-r1"} and "secagg-consent" in r1.seconds and "secagg-consent" not in r2.seconds
    # round 2: bank-2 sent its masked input, then went silent at unmask: its input counts (its self
    # mask rebuilt from the others' shares)
    assert r2.participants == ["bank-0", "bank-1", "bank-2", "bank-3"]
    # bank-3 was silent from round 1's masked input on, so round 2's keys were not all advertised ahead
    assert "secagg-advertise" in r2.seconds and "secagg-advertise-ahead" not in r2.seconds
    assert_mean_of_kept_deltas(tmp_path, 2, ["bank-0", "bank-1", "bank-2", "bank-3"])
    # bank-3 caught up with round 1 before training round 2; everyone ends on round 2's model
    assert all(bank_state(tmp_path, f"bank-{i}")["applied_round"] == 2 for i in range(4))


class VanishingGrid(DroppingGrid):
    """A dropped bank's node also leaves the SuperLink's online list: a SuperNode that died after
    it took its message (the SuperLink then makes no error reply; only the heartbeat stops)."""

    def __init__(self, node_configs, run_config, drops) -> None:
        super().__init__(node_configs, run_config, drops)
        self.gone: set[int] = set()

    def silent(self, msg) -> bool:
        if super().silent(msg):
            self.gone.add(msg.metadata.dst_node_id)
            return True
        return False

    def get_node_ids(self):
        return [n for n in super().get_node_ids() if n not in self.gone]


def test_a_bank_gone_offline_is_not_waited_for_until_the_round_timeout(tmp_path, keys, monkeypatch):
    """Issue 27's leftover: a crash after "ready" cost the whole round-timeout (619 s in a compose
    test). A node the SuperLink lists offline is waited for OFFLINE_AFTER_SECONDS, then named."""
    monkeypatch.setattr(federation_module, "OFFLINE_CHECK_SECONDS", 0.2)
    monkeypatch.setattr(federation_module, "OFFLINE_AFTER_SECONDS", 1.0)
    config = run_config(tmp_path, **{"num-rounds": 1, "round-timeout": 120.0, "rejoin-grace": 0})
    grid = VanishingGrid(banks(4), config, {(1, 103): SecAggStage.MASKED_INPUT})
    started = time.monotonic()
    [r1] = run_job(tmp_path, grid, config).rounds
    assert time.monotonic() - started < 90, "waited for the offline bank until the round-timeout"
    assert r1.aggregated and r1.participants == ["bank-0", "bank-1", "bank-2"]
    assert r1.outcomes["bank-3"] == "crashed after ready"
    assert "nothing at stage masked_input: went offline (no heartbeat at the SuperLink" in r1.left_out["bank-3"]


def test_fewer_survivors_than_the_threshold_abort_the_round_and_nothing_is_applied(tmp_path, keys):
    config = run_config(tmp_path)
    drops = {(1, 102): SecAggStage.MASKED_INPUT, (1, 103): SecAggStage.MASKED_INPUT}  # 2 survivors, t = 3
    federation = Federation(
        grid=DroppingGrid(banks(4), config, drops), job=JobConfig.from_run_config(config), reporter=SilentReporter()
    )
    state = federation.run()
    r1, r2 = state.rounds
    assert not r1.aggregated and r1.participants == []
    assert "secure aggregation aborted (too_few)" in r1.no_aggregate and "masked_input" in r1.no_aggregate
    # the honest banks are "aborted by others", and the round's reason names the others (issue 27)
    assert r1.outcomes["bank-0"] == r1.outcomes["bank-1"] == "aborted by others"
    assert r1.outcomes["bank-2"] == r1.outcomes["bank-3"] == "crashed after ready"
    assert "caused by: bank-2 crashed after ready (said ready at the pre-flight, then no reply" in r1.no_aggregate
    assert "bank-3 crashed after ready" in r1.no_aggregate
    assert not (tmp_path / "server" / JOB / "aggregates" / "round-0001.bundle").exists()
    assert 1 not in federation.store.aggregates_after(state, 0)
    # the trained banks' budget is on the record (mirrored as dropped, with their commitment)
    mirror = tmp_path / "server" / JOB / "ledger-mirror" / "bank-0.jsonl"
    first = json.loads(mirror.read_text().splitlines()[0])
    assert (first["round"], first["server_status"]) == (1, "dropped") and first["commitment"]["status"] == "trained"
    # round 2 runs with all four and aggregates; nothing of round 1 was ever applied
    assert r2.aggregated and r2.participants == ["bank-0", "bank-1", "bank-2", "bank-3"]
    assert_mean_of_kept_deltas(tmp_path, 2, ["bank-0", "bank-1", "bank-2", "bank-3"])
    assert "rounds without an aggregate" in state.end_reason


class CrashingGrid(LocalGrid):
    """The server dies (like a SIGKILL) right after the banks answered round 1's masked-input stage."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if messages and messages[0].metadata.message_type == SecAggStage.MASKED_INPUT.message_type:
            if messages[0].metadata.group_id.endswith("-r1"):
                raise KeyboardInterrupt("server killed after the masked inputs arrived")
        return replies


def test_a_server_restart_after_the_masked_inputs_never_makes_a_bank_train_or_mask_twice(tmp_path, keys):
    config = run_config(tmp_path)
    job = JobConfig.from_run_config(config)
    with pytest.raises(KeyboardInterrupt):
        Federation(grid=CrashingGrid(banks(4), config), job=job, reporter=SilentReporter()).run()
    state = Federation(grid=LocalGrid(banks(4), config), job=job, reporter=SilentReporter()).run()
    r1, r2 = state.rounds
    # the restarted round 1 has the same setup: every bank answers each repeated request with the reply
    # it already gave (its kept advertisement, shares and masked input), so round 1 is aggregated from
    # the releases already made; no bank trains or masks its update a second time (issue 27)
    four = ["bank-0", "bank-1", "bank-2", "bank-3"]
    assert r1.aggregated and r1.participants == four and set(r1.outcomes.values()) == {"contributed"}
    assert r2.aggregated and r2.participants == four
    assert_mean_of_kept_deltas(tmp_path, 1, four)
    assert_mean_of_kept_deltas(tmp_path, 2, four)
    for bank in ("bank-0", "bank-1", "bank-2", "bank-3"):
        assert ledger_rounds(tmp_path, bank) == [(1, "trained"), (2, "trained")]


class AheadTamperingGrid(LocalGrid):
    """A server that sends a bad "next round" stage with round 1's messages: with the masked-input
    requests junk or round 1's own setup again (a bank must never re-key a round it is masking), with
    the unmask orders a junk share-keys request."""

    def __init__(self, node_configs, run_config, stage: SecAggStage, ahead: bytes) -> None:
        super().__init__(node_configs, run_config)
        self.stage, self.ahead = stage, ahead
        self.tampered = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == self.stage.message_type:
                request = RoundRequest.from_content(msg.content)
                if request.secagg_next:  # junk, or round r's own setup replayed
                    bad = self.ahead or self.this_round(request).to_bytes()
                    msg.content = replace(request, secagg_next=bad).to_content()
                    self.tampered += 1
        return super().send_and_receive(messages, timeout=timeout)

    @staticmethod
    def this_round(request: RoundRequest) -> RoundSetup:
        return replace(RoundSetup.from_bytes(request.secagg_next), round=request.round)


@pytest.mark.parametrize(
    ("stage", "ahead"),
    [(SecAggStage.MASKED_INPUT, b"junk"), (SecAggStage.MASKED_INPUT, b""), (SecAggStage.UNMASK, b"junk")],
    ids=["junk-setup", "this-rounds-setup-again", "junk-share-request"],
)
def test_a_bad_stage_ahead_never_costs_the_carrying_stage(tmp_path, keys, stage, ahead):
    config = run_config(tmp_path)
    grid = AheadTamperingGrid(banks(3), config, stage, ahead)
    state = run_job(tmp_path, grid, config)
    r1, r2 = state.rounds
    assert grid.tampered == 3  # round 1's stage carried the next round's to each bank, spoiled here
    assert r1.aggregated and r2.aggregated  # every bank still masked and unmasked round 1
    assert_mean_of_kept_deltas(tmp_path, 1, ["bank-0", "bank-1", "bank-2"])
    # nothing usable came back ahead: round 2 ran its own advertise and share-keys stages
    assert {"secagg-advertise", "secagg-share_keys"} <= set(r2.seconds)
    assert "secagg-share_keys-ahead" not in r2.seconds
    assert_mean_of_kept_deltas(tmp_path, 2, ["bank-0", "bank-1", "bank-2"])


class ShareAheadGrid(LocalGrid):
    """Junks round 1's share-keys request ahead for one node, or dies (like a SIGKILL) at round 2's
    first message; keeps each bank's round-2 advertisements: sent ahead, and from an advertise stage."""

    def __init__(self, node_configs, run_config, *, junk_node: int = 0, crash: bool = False) -> None:
        super().__init__(node_configs, run_config)
        self.junk_node, self.crash = junk_node, crash
        self.ads: dict[tuple[str, str], bytes] = {}  # ("ahead" | "advertise", bank) -> KeyAdvertisement

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            if self.crash and msg.metadata.group_id.endswith("-r2"):
                raise KeyboardInterrupt("server killed before round 2")
            if (
                msg.metadata.message_type == SecAggStage.UNMASK.message_type
                and msg.metadata.dst_node_id == self.junk_node
            ):
                msg.content = replace(RoundRequest.from_content(msg.content), secagg_next=b"junk").to_content()
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            kind, group = reply.metadata.message_type, reply.metadata.group_id
            if reply.has_error() or not kind.startswith("train.secagg_"):
                continue
            tr = TrainReply.from_content(reply.content)
            if kind == SecAggStage.MASKED_INPUT.message_type and group.endswith("-r1"):
                self.ads["ahead", tr.bank_id] = tr.next_bundle
            elif kind == SecAggStage.ADVERTISE.message_type and group.endswith("-r2"):
                self.ads["advertise", tr.bank_id] = tr.bundle
        return replies


@pytest.mark.parametrize("how", ["one-bank-did-not-share", "server-restart"])
def test_keys_shared_ahead_are_never_shared_twice(tmp_path, keys, how):
    """When round 2 cannot start from what was shared ahead, it advertises again: a bank whose keys
    were shared takes fresh keys (two Shamir sharings of one secret must never leave a bank), and
    one that only advertised keeps its keys."""
    config = run_config(tmp_path)
    job = JobConfig.from_run_config(config)
    three = ["bank-0", "bank-1", "bank-2"]
    shared = {"bank-0", "bank-2"} if how == "one-bank-did-not-share" else set(three)
    grid = ShareAheadGrid(banks(3), config, junk_node=101 if how == "one-bank-did-not-share" else 0)
    if how == "server-restart":
        crashed = ShareAheadGrid(banks(3), config, crash=True)
        with pytest.raises(KeyboardInterrupt):
            Federation(grid=crashed, job=job, reporter=SilentReporter()).run()
        grid.ads = dict(crashed.ads)  # round 2's advertisements sent ahead, before the crash
    state = run_job(tmp_path, grid, config)
    r2 = state.rounds[-1]
    assert r2.round == 2 and r2.aggregated and r2.participants == three
    assert {"secagg-advertise", "secagg-share_keys"} <= set(r2.seconds)
    assert_mean_of_kept_deltas(tmp_path, 2, three)
    for bank in three:  # fresh keys where they were shared ahead, the same advertisement elsewhere
        assert grid.ads["ahead", bank] and grid.ads["advertise", bank]
        assert (grid.ads["advertise", bank] != grid.ads["ahead", bank]) == (bank in shared), bank


def test_no_keys_are_shared_ahead_for_a_bank_whose_budget_is_spent(tmp_path, keys):
    """bank-3 plans one round: its round-1 reply says its budget is spent, so round 2 is the other
    three and no bank deals shares of round 2's keys for the four (they would be dealt for nothing)."""
    config = run_config(tmp_path)
    nodes = banks(4)
    nodes[103]["planned-rounds"] = 1
    grid = ShareAheadGrid(nodes, config)
    sent_ahead: list[bytes] = []
    deliver = grid.send_and_receive

    def recording(messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == SecAggStage.UNMASK.message_type:
                sent_ahead.append(RoundRequest.from_content(msg.content).secagg_next)
        return deliver(messages, timeout=timeout)

    grid.send_and_receive = recording
    state = run_job(tmp_path, grid, config)
    r1, r2 = state.rounds
    assert "bank-3" in state.exhausted and r2.participants == ["bank-0", "bank-1", "bank-2"]
    assert r1.aggregated and r2.aggregated and len(sent_ahead) == 4 + 3 and not any(sent_ahead)
    assert {"secagg-advertise", "secagg-share_keys"} <= set(r2.seconds)
    assert not list((tmp_path / "banks" / "bank-0" / "jobs" / JOB / "secagg").glob("*.json"))


def test_a_fresh_job_advertises_round_1_with_the_binding(tmp_path):
    """Every pinned bank's node is new: the identify request carries round 1's setup for all of them,
    so no round of the job has an advertise exchange of its own."""
    loopback_ceremony(tmp_path / "keys", ["bank-0", "bank-1", "bank-2"])
    config = run_config(tmp_path)
    grid = LocalGrid(banks(3), config)
    state = run_job(tmp_path, grid, config)
    assert all(r.aggregated and "secagg-advertise-ahead" in r.seconds for r in state.rounds)
    assert not any(kind == SecAggStage.ADVERTISE.message_type for _, kind, _ in grid.delivered)
    for round_idx in (1, 2):
        assert_mean_of_kept_deltas(tmp_path, round_idx, ["bank-0", "bank-1", "bank-2"])
