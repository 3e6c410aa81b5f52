"""One lifetime budget per dataset identity, and nothing derived from n in what the server sees (issue 26).

On the old code the ledger lived under a fingerprint of the records *in file order* plus the privacy
unit: the same records reordered, with one row duplicated, or requested at `privacy-unit =
"customer"` each opened a fresh ledger and trained again past a spent budget. Refusal reasons
carried n ("got 144"), q and 1/n, which the server mirrors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedmoe.crypto import keygen, load_public_context
from fedmoe.crypto.keys import PUBLIC_FILE
from fedmoe.fl_client.bank import handle_train
from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.data import generate_bank_corpus, make_bank_profiles, write_jsonl
from fedmoe.fl_client.task import data_fingerprint
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.errors import ConfigError
from fedmoe.protocol.ledger import Ledger, mirror_entry
from fedmoe.protocol.messages import RoundRequest, TrainStatus
from tests.fl_client.test_bank_policy import make_job as policy_job

N_RECORDS = 120


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    keygen(out)
    return out


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return generate_bank_corpus(make_bank_profiles(2, seed=0)[0], N_RECORDS, seed=0)


def make_job(keys: Path, root: Path, job_id: str, **overrides) -> JobConfig:
    """test_bank_policy's tiny job, one round at epsilon 3 and batch 8 (these banks read a data file)."""
    fields = dict(job_id=job_id, num_rounds=1, epsilon=3.0, batch_size=8)
    return policy_job(keys, root, **(fields | overrides))


RECORD_LEVEL = 'privacy-unit = "record"\n'  # these records carry customer ids: customer-level is the default


def bank_on(
    job: JobConfig, root: Path, rows: list[dict], policy: str = "epsilon = 3.0\n" + RECORD_LEVEL, name: str = "d"
) -> BankConfig:
    data = write_jsonl(rows, root / f"{name}.jsonl")
    (root / "policy.toml").write_text(policy, encoding="utf-8")
    node = {"bank-id": "bank-0", "data-path": str(data), "policy-file": str(root / "policy.toml")}
    return BankConfig.from_node_config(node, job)


def train(job: JobConfig, bank: BankConfig):
    key = load_public_context(Path(job.key_dir) / PUBLIC_FILE)
    return handle_train(job, bank, RoundRequest(job.job_id, 1, key.key_id, key.epoch))


def ledgers(bank: BankConfig) -> list[Path]:
    return sorted(bank.state_root.glob("privacy/*/ledger.jsonl"))


def test_the_fingerprint_ignores_row_order_duplicates_and_the_unit(records):
    assert data_fingerprint(records) == data_fingerprint(records[::-1]) == data_fingerprint([*records, records[3]])
    assert data_fingerprint(records) != data_fingerprint(records[1:])


def _spend_the_budget(keys, tmp_path, records) -> tuple[BankConfig, list]:
    job = make_job(keys, tmp_path, "first")
    bank = bank_on(job, tmp_path, records)
    assert train(job, bank).status is TrainStatus.OK
    [path] = ledgers(bank)
    history = Ledger(path).entries()[-1]["history"]
    assert len(history) == 1
    return bank, history


@pytest.mark.parametrize(
    "variant",
    ["reordered", "duplicated-row", "customer-unit", "rows-added", "same-customers-new-rows"],
)
def test_a_spent_budget_is_not_reset_by_reordering_duplicating_adding_rows_or_a_stronger_unit(
    keys, tmp_path, records, variant
):
    _, history = _spend_the_budget(keys, tmp_path, records)
    rows = {
        "reordered": records[::-1],
        "duplicated-row": [*records, records[0]],
        "customer-unit": records,
        "rows-added": [*records, *generate_bank_corpus(make_bank_profiles(2, seed=0)[1], 20, seed=1)],
        "same-customers-new-rows": [{**r, "text": r["text"] + " (next month)"} for r in records],
    }[variant]
    unit = {"privacy_unit": "customer"} if variant == "customer-unit" else {}
    job = make_job(keys, tmp_path, "second", **unit)
    bank = bank_on(job, tmp_path, rows, name=variant)
    reply = train(job, bank)
    assert reply.status is TrainStatus.REFUSED and not reply.bundle, reply.reason
    assert "rule 'lifetime-budget'" in reply.reason and "epsilon <= 3" in reply.reason
    [path] = ledgers(bank)  # one ledger for the dataset, never a second
    last = Ledger(path).entries()[-1]
    assert last["status"] == "refused" and last["history"] == history  # nothing spent
    assert last["job_id"] == "second"


def test_records_of_two_ledgers_are_refused_as_an_overlap_naming_the_rule(keys, tmp_path, records):
    _spend_the_budget(keys, tmp_path, records)
    job = make_job(keys, tmp_path, "named")
    bank = bank_on(
        job, tmp_path, records, policy='epsilon = 3.0\ndataset-id = "cards-2026"\n' + RECORD_LEVEL, name="named"
    )
    reply = train(job, bank)
    assert reply.status is TrainStatus.REFUSED and "rule 'dataset-overlap'" in reply.reason, reply.reason
    assert "cards-2026" not in reply.reason  # the bank's own names stay at the bank
    named = bank.state_root / "privacy" / "cards-2026" / "ledger.jsonl"
    assert named in ledgers(bank) and len(ledgers(bank)) == 2
    assert [e["status"] for e in Ledger(named).entries()] == ["refused"]  # nothing spent


def test_node_config_may_only_tighten_the_policy(keys, tmp_path, records):
    job = make_job(keys, tmp_path, "first")
    (tmp_path / "policy.toml").write_text("epsilon = 3.0\n", encoding="utf-8")
    node = {"bank-id": "bank-0", "policy-file": str(tmp_path / "policy.toml")}
    with pytest.raises(ConfigError, match="node-config 'epsilon' = 20 loosens.*'node-config-tightens-only'"):
        BankConfig.from_node_config({**node, "epsilon": 20.0}, job)
    tight = BankConfig.from_node_config({**node, "epsilon": 2.0}, job).policy
    assert tight.epsilon == 2.0 and tight.overrides == (("epsilon", 2.0),)
    assert tight.file_hash == BankConfig.from_node_config(node, job).policy.content_hash()


# ---- nothing derived from n reaches the server ----------------------------------------------------


def _n_numbers(n: int, job: JobConfig) -> list[str]:
    """Every rendering of n, q = B/n and 1/n a message could carry."""
    q, inv = job.batch_size / n, 1.0 / n
    out = {str(n), f"{q:.4g}", f"{q:.3g}", f"{q:.5f}", f"{inv:.3g}", f"{inv:.5f}", f"{inv:.4g}"}
    return sorted(out)


def _server_visible(reply, job: JobConfig, root: Path) -> str:
    """The reply, and the server's mirror line for it (what the server writes from a refusal)."""
    mirror = Ledger(root / "server" / "ledger-mirror" / "bank-0.jsonl")
    commitment = json.loads(reply.ledger_commitment)
    mirror.append(mirror_entry(job_id=job.job_id, bank_id="bank-0", round=1, server_status="received",
                               commitment=commitment, reason=reply.reason))  # fmt: skip
    texts = [reply.reason, json.dumps(reply.metrics), reply.ledger_commitment, mirror.path.read_text("utf-8")]
    return "\n".join(texts)


@pytest.mark.parametrize(
    "kind,job_overrides,policy",
    [
        ("batch-size", {"batch_size": 1000}, "epsilon = 3.0\n" + RECORD_LEVEL),
        ("delta-below-1/n", {"delta": 1e-5}, "epsilon = 3.0\nmax-delta = 0.5\n" + RECORD_LEVEL),
        ("min-noise-multiplier", {"epsilon": 50.0}, "epsilon = 60.0\nmin-noise-multiplier = 5.0\n" + RECORD_LEVEL),
        ("lifetime-budget", {}, "epsilon = 3.0\n" + RECORD_LEVEL),
    ],
)
def test_no_refusal_carries_a_number_derived_from_n(keys, tmp_path, records, kind, job_overrides, policy):
    if kind == "lifetime-budget":
        _spend_the_budget(keys, tmp_path, records)
    job = make_job(keys, tmp_path, "probe", **job_overrides)
    bank = bank_on(job, tmp_path, records, policy=policy, name="probe")
    reply = train(job, bank)
    assert reply.status is TrainStatus.REFUSED and f"rule '{kind}'" in reply.reason, reply.reason
    from fedmoe.fl_client.task import load_bank_data

    n = len(load_bank_data(job, bank, 10**6).train)
    visible = _server_visible(reply, job, tmp_path)
    for number in _n_numbers(n, job):  # not inside a longer number or a hex hash
        assert not re.search(rf"(?<![0-9a-f.]){re.escape(number)}(?![0-9a-f])", visible), (number, reply.reason)
    assert "sigma" not in reply.reason and "q=" not in reply.reason and "1/n =" not in reply.reason


# ---- customer-level DP is the default on data with customer ids (item 5) -------------------------


def test_customer_level_is_the_default_when_the_data_has_customer_ids(keys, tmp_path, records):
    from fedmoe.audit import audit_ledgers

    job = make_job(keys, tmp_path, "default-unit", epsilon=8.0, batch_size=2)  # the job asks for "record"
    bank = bank_on(job, tmp_path, records, policy="")
    assert train(job, bank).status is TrainStatus.OK
    [entry] = Ledger(ledgers(bank)[0]).entries()
    assert entry["privacy_unit"] == "customer" and entry["customer_ids"] is True
    assert entry["n_samples"] < len({r["customer_id"] for r in records})  # customers (the held-out ones apart)
    assert not [f for f in audit_ledgers(ledgers(bank)).findings if f.check == "record-level"]


def test_record_level_on_customer_data_only_by_an_explicit_policy_line_the_audit_shows(keys, tmp_path, records):
    from fedmoe.audit import audit_ledgers

    job = make_job(keys, tmp_path, "record-unit", epsilon=8.0)
    bank = bank_on(job, tmp_path, records, policy='privacy-unit = "record"\n')
    assert train(job, bank).status is TrainStatus.OK
    [entry] = Ledger(ledgers(bank)[0]).entries()
    assert entry["privacy_unit"] == "record" and entry["customer_ids"] is True
    result = audit_ledgers(ledgers(bank))
    assert result.ok and [f.check for f in result.warnings if f.check == "record-level"] == ["record-level"]


def test_every_entry_records_the_replace_one_epsilon(keys, tmp_path, records):
    """sigma is calibrated from n, so the update's noise level can reveal n; with n known the
    replace-one epsilon is what counts, and the ledger records it (issue 26, item 2)."""
    from fedmoe.fl_client.dp.accountant import epsilon_replace_one

    bank, history = _spend_the_budget(keys, tmp_path, records)
    [entry] = Ledger(ledgers(bank)[0]).entries()
    assert entry["epsilon_replace_one"] == pytest.approx(epsilon_replace_one(history, delta=entry["delta"]))
    assert entry["epsilon_replace_one"] > entry["epsilon_pld"]  # replace-one costs more than add/remove


def test_the_budget_holds_under_replace_one_adjacency(keys, tmp_path, records):
    """The noise level and the batch-size refusal depend on n, so the bank's guarantee must hold with n
    public: the calibrated sigma meets the budget under replace-one too (issue 26, item 2)."""
    from fedmoe.fl_client.dp.accountant import CALIBRATION_TOLERANCE

    bank, _ = _spend_the_budget(keys, tmp_path, records)
    [entry] = Ledger(ledgers(bank)[0]).entries()
    budget = entry["budget_epsilon"]
    assert budget - CALIBRATION_TOLERANCE <= entry["epsilon_replace_one"] <= budget
    assert entry["epsilon"] < entry["epsilon_replace_one"]  # add/remove is the smaller one here
