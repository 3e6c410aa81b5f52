"""A refused job cannot write the server's numbers into a bank's record (issue 27).

On the old code a refusal's ledger entry stored the values the job asked for (`budget_epsilon` 50,
`noise_source` "seeded"), and the audit judged the bank by them: "[seeded-noise] ... epsilon is
infinite in practice", "budget changed from 8.0 to 50.0". A server only had to submit a job that
would be refused. Now the entry's values are the bank's own, within its policy, and the request
is recorded under `requested`.
"""

from __future__ import annotations

import pytest

from fedmoe.audit import audit_ledgers
from fedmoe.protocol.messages import TrainStatus
from tests.fl_client.test_bank_policy import bank_config, keys, ledger_entries, make_job, train  # noqa: F401

POLICY = "epsilon = 8.0\n"


@pytest.mark.parametrize(
    "asked,check",
    [
        ({"epsilon": 50.0}, lambda e: e["budget_epsilon"] == 8.0),
        ({"secure_mode": False}, lambda e: e["noise_source"] == "csprng" and e["secure_mode"] is True),
        ({"delta": 0.1}, lambda e: e["delta"] <= 1e-5),
        ({"clip_norm": 100.0}, lambda e: e["clip_norm"] <= 10.0),
    ],
)
def test_a_refusal_records_the_request_apart_from_the_banks_own_values(keys, tmp_path, asked, check):  # noqa: F811
    job = make_job(keys, tmp_path, **({"epsilon": 8.0} | asked))
    bank = bank_config(job, tmp_path, POLICY)
    first = make_job(keys, tmp_path, job_id="honest", epsilon=8.0)
    assert train(first, bank_config(first, tmp_path, POLICY)).status is TrainStatus.OK  # a trained round first
    assert train(job, bank).status is TrainStatus.REFUSED
    honest, refused = ledger_entries(bank)
    assert refused["status"] == "refused" and check(refused), refused
    for key, value in asked.items():
        assert refused["requested"][key.replace("_", "-")] == value
    result = audit_ledgers(list(bank.state_root.glob("privacy/*/ledger.jsonl")))
    judged = [f for f in result.findings if f.check in {"seeded-noise", "budget-changed", "budget"}]
    assert result.ok and not judged, [str(f) for f in result.findings]


def test_the_budget_of_a_refusal_is_the_policys_when_it_is_below_the_job(keys, tmp_path):  # noqa: F811
    job = make_job(keys, tmp_path, epsilon=8.0)
    bank = bank_config(job, tmp_path, "epsilon = 0.001\n")
    assert train(job, bank).status is TrainStatus.REFUSED
    [entry] = ledger_entries(bank)
    assert entry["budget_epsilon"] == 0.001 and entry["requested"]["epsilon"] == 8.0


def test_plaintext_deltas_reach_the_disk_only_by_the_banks_policy(keys, tmp_path):  # noqa: F811
    """On the old code `keep-plaintext-deltas` was a run-config key: the server made banks write their
    plaintext updates to disk (6 files in one run). Now a run config cannot ask for it (issue 27)."""
    from fedmoe.protocol.config import JobConfig

    job = JobConfig.from_run_config(make_job(keys, tmp_path).to_run_config() | {"keep-plaintext-deltas": True})
    bank = bank_config(job, tmp_path)
    assert train(job, bank).status is TrainStatus.OK
    assert not list(bank.state_root.rglob("deltas/*.safetensors"))
    (tmp_path / "keeping").mkdir()
    own = make_job(keys, tmp_path / "keeping")
    keeping = bank_config(own, tmp_path / "keeping", "keep-plaintext-deltas = true\n")
    assert train(own, keeping).status is TrainStatus.OK
    assert len(list(keeping.state_root.rglob("deltas/*.safetensors"))) == 1
