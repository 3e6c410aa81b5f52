"""The bank's own policy decides its privacy, whatever the job (the server) asks.

Each case here is a finding of the hostile-server review: on the old code the bank accepted
`dp=false`, a larger epsilon or delta, seeded noise and a weaker privacy unit from the run config,
started every job at epsilon 0, and trained twice for two concurrent requests.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from fedmoe.audit import audit_ledgers
from fedmoe.crypto import keygen, load_public_context
from fedmoe.crypto.keys import PUBLIC_FILE
from fedmoe.fl_client.bank import handle_train
from fedmoe.fl_client.config import BankConfig
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.ledger import Ledger
from fedmoe.protocol.messages import RoundRequest, TrainStatus


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    keygen(out)
    return out


def make_job(keys: Path, root: Path, **overrides) -> JobConfig:
    fields = dict(
        job_id="policy",
        model_preset="tiny",
        records_per_bank=160,
        seq_len=32,
        local_steps=2,
        num_rounds=2,
        min_banks=1,
        key_dir=str(keys),
        bank_state_root=str(root / "banks"),
        server_state_dir=str(root / "server"),
    )
    return JobConfig(**(fields | overrides))


def bank_config(job: JobConfig, root: Path, policy: str = "") -> BankConfig:
    node = {"bank-id": "bank-0", "partition-id": 0}
    if policy:
        (root / "policy.toml").write_text(policy, encoding="utf-8")
        node["policy-file"] = str(root / "policy.toml")
    return BankConfig.from_node_config(node, job)


def train(job: JobConfig, bank: BankConfig, round_idx: int = 1):
    key = load_public_context(Path(job.key_dir) / PUBLIC_FILE)
    return handle_train(job, bank, RoundRequest(job.job_id, round_idx, key.key_id, key.epoch))


def ledger_entries(bank: BankConfig) -> list[dict]:
    [path] = list(bank.state_root.glob("privacy/*/ledger.jsonl"))
    return Ledger(path).entries()


@pytest.mark.parametrize(
    "override,policy,key",
    [
        ({"dp": False}, "", "dp"),
        ({"epsilon": 50.0}, "epsilon = 3.0\n", "epsilon"),
        ({"delta": 0.1}, "", "delta"),
        ({"secure_mode": False}, "", "secure-mode"),
        ({"privacy_unit": "record"}, 'privacy-unit = "customer"\n', "privacy-unit"),
        ({"clip_norm": 100.0}, "", "clip-norm"),
    ],
)
def test_a_job_asking_for_weaker_privacy_is_refused_naming_the_key(keys, tmp_path, override, policy, key):
    job = make_job(keys, tmp_path, **override)
    bank = bank_config(job, tmp_path, policy)
    reply = train(job, bank)
    assert reply.status is TrainStatus.REFUSED and not reply.bundle
    assert f"run config '{key}'" in reply.reason and "policy" in reply.reason, reply.reason
    [entry] = ledger_entries(bank)  # on the bank's own record, nothing spent
    assert entry["status"] == "refused" and entry["history"] == [] and entry["epsilon"] == 0.0
    assert not list(bank.state_root.glob("privacy/*/accountant.json"))
    commitment = json.loads(reply.ledger_commitment)
    assert commitment["hash"] == entry["hash"] and commitment["exhausted"] is True


def test_a_second_job_on_the_same_data_continues_the_epsilon_already_spent(keys, tmp_path):
    first = make_job(keys, tmp_path, job_id="first")
    bank = bank_config(first, tmp_path)
    assert train(first, bank).status is TrainStatus.OK
    spent = ledger_entries(bank)[-1]["epsilon"]
    second = make_job(keys, tmp_path, job_id="second")
    assert train(second, bank).status is TrainStatus.OK
    entries = ledger_entries(bank)  # one ledger for the dataset, both jobs in it
    assert [e["job_id"] for e in entries] == ["first", "second"]
    assert entries[-1]["epsilon_before"] == pytest.approx(spent) and entries[-1]["epsilon"] > spent
    assert len(entries[-1]["history"]) == 2
    assert audit_ledgers(list(bank.state_root.glob("privacy/*/ledger.jsonl"))).ok


def test_two_concurrent_train_requests_never_release_more_than_the_ledger_records(keys, tmp_path):
    job = make_job(keys, tmp_path)
    bank = bank_config(job, tmp_path)
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(train(job, bank))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status for r in replies] == [TrainStatus.OK, TrainStatus.OK]
    assert replies[0].bundle == replies[1].bundle  # the second request got what was released, again
    trained = [e for e in ledger_entries(bank) if e["status"] == "trained"]
    assert len(trained) == 1 and len(trained[0]["history"]) == 1


def test_seeded_noise_is_the_banks_choice_and_fails_the_audit(keys, tmp_path):
    job = make_job(keys, tmp_path, secure_mode=False)
    bank = bank_config(job, tmp_path, "seeded-noise = true\n")
    assert train(job, bank).status is TrainStatus.OK
    [entry] = ledger_entries(bank)
    assert entry["noise_source"] == "seeded" and entry["secure_mode"] is False
    result = audit_ledgers(list(bank.state_root.glob("privacy/*/ledger.jsonl")))
    assert not result.ok and [f.check for f in result.errors] == ["seeded-noise"]


def test_csprng_noise_is_the_default_and_passes_the_audit(keys, tmp_path):
    job = make_job(keys, tmp_path)
    bank = bank_config(job, tmp_path)
    reply = train(job, bank)
    assert reply.status is TrainStatus.OK
    assert set(reply.metrics) == {"seconds-train", "seconds-encrypt"}  # no loss, no epsilon, no n leaves
    [entry] = ledger_entries(bank)
    assert entry["noise_source"] == "csprng" and entry["secure_mode"] is True
    assert audit_ledgers(list(bank.state_root.glob("privacy/*/ledger.jsonl"))).ok


# ---- secure aggregation: the bank owns its floor and whether it accepts shared-key rounds (issue 25)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", ["deploy/bank-policy.example.toml", "deploy/demo-bank-policy.toml"])
def test_the_example_policies_parse_and_name_the_floor(path):
    from fedmoe.fl_client.policy import BankPolicy

    policy = BankPolicy.from_file(ROOT / path)
    assert policy.min_banks == 3 and policy.allow_shared_key_aggregation  # the defaults (test_config.py)


@pytest.mark.parametrize(
    ("text", "message"), [("min-banks = 2\n", "an integer >= 3"), ("min-banks = 3.5\n", "an integer")]
)
def test_a_floor_below_three_or_not_an_integer_is_refused_naming_the_key(tmp_path, text, message):
    from fedmoe.fl_client.policy import BankPolicy
    from fedmoe.protocol.errors import ConfigError

    (tmp_path / "p.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"'min-banks' expected {message}"):
        BankPolicy.from_file(tmp_path / "p.toml")


def test_a_bank_whose_policy_forbids_shared_key_rounds_refuses_a_ckks_job_before_training(keys, tmp_path):
    job = make_job(keys, tmp_path, aggregation="ckks")
    bank = bank_config(job, tmp_path, "allow-shared-key-aggregation = false\n")
    reply = train(job, bank)
    assert reply.status is TrainStatus.REFUSED and "'aggregation' = 'ckks'" in reply.reason
    assert [e["status"] for e in ledger_entries(bank)] == ["refused"]  # nothing spent


@pytest.fixture(scope="module")
def secagg_keys(tmp_path_factory) -> Path:
    from fedmoe.fl_server.ceremony import loopback_ceremony

    out = tmp_path_factory.mktemp("secagg-keys")
    loopback_ceremony(out, ["bank-0", "bank-1", "bank-2", "bank-3"])
    return out


def _advertise(job, bank, setup):
    from fedmoe.fl_client.secagg_bank import SecAggKeys, advertise
    from fedmoe.protocol.messages import SecAggStage

    keys = SecAggKeys.load(bank)
    request = RoundRequest(job.job_id, 1, keys.bfv.key_id, 0, stage=SecAggStage.ADVERTISE, secagg=setup.to_bytes())
    return advertise(job, bank, keys, request)


def _setup(job, keys_dir: Path, participants, **changes):
    import dataclasses

    from fedmoe.crypto.secagg.bfv import PUBLIC_FILE, load_bfv_public
    from fedmoe.crypto.secagg.server import ServerSecAgg

    key = load_bfv_public(keys_dir / PUBLIC_FILE)
    setup = ServerSecAgg.make_setup(
        job_id=job.job_id, round=1, participants=participants, n_elements=10, key=key, min_banks=job.min_banks
    )
    return dataclasses.replace(setup, **changes)


def test_a_bank_refuses_a_secure_aggregation_setup_below_its_own_floor(secagg_keys, tmp_path):
    """The server writes the job's min-banks (2 here); the bank's policy floor decides."""
    from fedmoe.crypto.errors import CryptoError
    from fedmoe.crypto.secagg.messages import KeyAdvertisement

    job = make_job(secagg_keys, tmp_path, aggregation="secagg", min_banks=2)
    three = ["bank-0", "bank-1", "bank-2"]
    strict = bank_config(job, tmp_path, "min-banks = 4\n")
    with pytest.raises(CryptoError, match="floor of 4"):
        _advertise(job, strict, _setup(job, secagg_keys, three))
    assert not list(strict.state_root.rglob("round-*.json"))  # no round keys drawn
    # the default floor (3) takes three participants, never two
    default = bank_config(job, tmp_path)
    assert KeyAdvertisement.from_bytes(_advertise(job, default, _setup(job, secagg_keys, three)).bundle)
    with pytest.raises(CryptoError, match="floor of 3"):
        _advertise(job, default, _setup(job, secagg_keys, ["bank-0", "bank-1"], threshold=2))


@pytest.mark.parametrize("change", ["bfv_key_id", "params"])
def test_a_bank_refuses_a_setup_that_is_not_for_its_bfv_key(secagg_keys, tmp_path, change):
    from fedmoe.crypto.errors import CryptoError
    from fedmoe.crypto.secagg.params import SecAggParams

    job = make_job(secagg_keys, tmp_path, aggregation="secagg", min_banks=3)
    value = "f" * 64 if change == "bfv_key_id" else SecAggParams(scale_bits=16)
    bank = bank_config(job, tmp_path)
    with pytest.raises(CryptoError) as e:
        _advertise(job, bank, _setup(job, secagg_keys, ["bank-0", "bank-1", "bank-2"], **{change: value}))
    assert e.value.reason == "key_id"


def test_colluding_banks_raises_the_threshold_the_bank_accepts(secagg_keys, tmp_path):
    """Four participants, default t = 3: enough against the server plus one bank, not plus two."""
    from fedmoe.crypto.errors import CryptoError

    job = make_job(secagg_keys, tmp_path, aggregation="secagg", min_banks=3)
    four = ["bank-0", "bank-1", "bank-2", "bank-3"]
    assert _advertise(job, bank_config(job, tmp_path), _setup(job, secagg_keys, four)).bundle
    (tmp_path / "wary").mkdir()
    job = make_job(secagg_keys, tmp_path / "wary", aggregation="secagg", min_banks=3)  # its own state dir
    wary = bank_config(job, tmp_path / "wary", "colluding-banks = 2\n")
    with pytest.raises(CryptoError, match=r"threshold 3 is outside \[4, 4\]"):
        _advertise(job, wary, _setup(job, secagg_keys, four))
    assert _advertise(job, wary, _setup(job, secagg_keys, four, threshold=4)).bundle


def test_a_bank_reveals_a_round_key_only_as_its_policy_allows(secagg_keys, tmp_path):
    """reveal-on-quarantine (docs/secagg.md "Accountable rounds"): bank-2 poisoned round 1; bank-0
    reveals its round-1 mask key only if its policy says so, only for a round it has not applied,
    at most max-reveals times per job, and only what keep_for_reveal kept (no peer's share)."""
    import numpy as np

    from fedmoe.crypto.errors import CryptoError
    from fedmoe.crypto.identity import load_identity, load_pins
    from fedmoe.crypto.secagg.bank import BankSecAgg
    from fedmoe.crypto.secagg.bfv import PUBLIC_FILE, load_bfv_public
    from fedmoe.crypto.secagg.messages import RoundReveal
    from fedmoe.crypto.secagg.server import ServerSecAgg
    from fedmoe.fl_client.secagg_bank import SecAggKeys, keep_for_reveal, reveal_file, reveal_stage
    from fedmoe.protocol.config import PINS_FILE, identity_file_name

    job = make_job(secagg_keys, tmp_path, aggregation="secagg", min_banks=3)
    ids = [f"bank-{i}" for i in range(4)]
    pins, public = load_pins(secagg_keys / PINS_FILE), load_bfv_public(secagg_keys / PUBLIC_FILE)
    banks = {b: BankSecAgg(load_identity(secagg_keys / identity_file_name(b)), pins) for b in ids}
    setup = ServerSecAgg.make_setup(
        job_id=job.job_id, round=1, participants=ids, n_elements=10, key=public, min_banks=3
    )
    server = ServerSecAgg(setup, pins, public)
    reqs = server.receive_advertisements({b: banks[b].advertise(setup, public) for b in ids})
    reqs = server.receive_shares({b: banks[b].share_keys(q) for b, q in reqs.items()})
    deltas = {b: np.full(10, 10.0 if b == "bank-2" else 1e-6, np.float32) for b in ids}
    reqs = server.receive_masked_inputs({b: banks[b].masked_input(q, deltas[b], 1.0, public) for b, q in reqs.items()})
    orders = server.orders_without_consent()
    server.receive_unmask({b: banks[b].unmask(o) for b, o in orders.items()})
    evidence = server.evidence().to_bytes()

    no = bank_config(job, tmp_path)  # the default policy: never reveals
    keep_for_reveal(job, no, banks["bank-0"])
    with pytest.raises(CryptoError, match="'reveal-on-quarantine' is false"):
        reveal_stage(job, no, SecAggKeys.load(no), evidence)
    kept = json.loads(reveal_file(job, no, 1).read_text())
    assert kept["held"] == {} and kept["self_seed"] == "" and kept["share_sk"] == ""  # the mask key only
    assert oct(reveal_file(job, no, 1).stat().st_mode & 0o777) == "0o600"

    yes = bank_config(job, tmp_path, "reveal-on-quarantine = true\n")
    state = yes.job_dir(job.job_id) / "state.json"
    state.write_text(json.dumps({"applied_round": 1}))  # as if it had applied round 1
    with pytest.raises(CryptoError, match="applied"):
        reveal_stage(job, yes, SecAggKeys.load(yes), evidence)
    state.write_text(json.dumps({"applied_round": 0}))
    reveal = RoundReveal.from_bytes(reveal_stage(job, yes, SecAggKeys.load(yes), evidence))
    assert reveal.bank_id == "bank-0" and reveal.mask_sk == banks["bank-0"].mask_sk
    with pytest.raises(CryptoError, match="no more reveals"):  # max-reveals = 1 per job
        reveal_stage(job, yes, SecAggKeys.load(yes), evidence)


# ---- eval losses only for a model the server could not have chosen (issue 26, item 6) -------------


@pytest.mark.parametrize("known_only", [True, False])
def test_eval_losses_leave_only_for_the_consortiums_signed_aggregate(keys, tmp_path, known_only):
    """Under CKKS the server can encrypt any model with the public key (and round 0 is the job's own
    checkpoint): a bank that releases eval losses would report its held-out loss on a model of the
    server's choosing. With eval-only-known-models it releases none outside secure aggregation."""
    from fedmoe.fl_client.bank import handle_evaluate

    job = make_job(keys, tmp_path, aggregation="ckks", evaluate=True)
    policy = f'release-metrics = ["eval-loss"]\neval-only-known-models = {str(known_only).lower()}\n'
    bank = bank_config(job, tmp_path, policy)
    reply = train(job, bank)
    assert reply.status is TrainStatus.OK
    assert ("eval-loss" in reply.metrics) is not known_only, reply.metrics
    key = load_public_context(Path(job.key_dir) / PUBLIC_FILE)
    closing = handle_evaluate(job, bank, RoundRequest(job.job_id, 2, key.key_id, key.epoch))
    assert (closing.eval_loss is None) is known_only
