"""What a bank's pre-flight answers (fedmoe.fl_client.preflight): ready, or the refusal it would give.

The server may see the answer, so it names the rule and the policy's limit, never the data: a data
error is named by its type only (its text can quote a record).
"""

from __future__ import annotations

import shutil
from collections import namedtuple

from test_bank_policy import bank_config, keys, make_job, train  # noqa: F401

from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.preflight import MIN_FREE_BYTES, preflight
from fedmoe.protocol.messages import PREFLIGHT_READY, TrainStatus


def test_a_bank_that_can_train_is_ready_and_one_whose_policy_refuses_says_which_rule(keys, tmp_path):  # noqa: F811
    job = make_job(keys, tmp_path, epsilon=8.0)
    assert preflight(job, bank_config(job, tmp_path), 1) == PREFLIGHT_READY
    refusing = bank_config(job, tmp_path, "epsilon = 1.0\n")
    assert "rule 'epsilon'" in preflight(job, refusing, 1)


def test_a_spent_lifetime_budget_is_refused_before_training(keys, tmp_path):  # noqa: F811
    job = make_job(keys, tmp_path, epsilon=1.0, num_rounds=1)
    bank = bank_config(job, tmp_path, "epsilon = 1.0\n")
    assert train(job, bank).status is TrainStatus.OK  # the one planned round spends the budget
    again = make_job(keys, tmp_path, job_id="again", epsilon=1.0, num_rounds=1)
    assert "rule 'lifetime-budget'" in preflight(again, bank_config(again, tmp_path, "epsilon = 1.0\n"), 1)


def test_unreadable_data_is_named_by_its_type_only(keys, tmp_path):  # noqa: F811
    job = make_job(keys, tmp_path)
    data = tmp_path / "records.jsonl"
    data.write_text('{"text": "ACME PAYROLL 4411 secret-customer"}\nnot json at all, card 4111-1111\n')
    node = {"bank-id": "bank-0", "data-path": str(data)}
    answer = preflight(job, BankConfig.from_node_config(node, job), 1)
    assert answer.startswith("not ready: ") and "DataError" in answer
    assert "4111" not in answer and "secret" not in answer and str(data) not in answer


def test_a_full_disk_refuses(keys, tmp_path, monkeypatch):  # noqa: F811
    job = make_job(keys, tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 2**20, MIN_FREE_BYTES // 2))
    assert "rule 'disk-space'" in preflight(job, bank_config(job, tmp_path), 1)
