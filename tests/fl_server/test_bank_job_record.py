"""A bank exports the job it took part in from its own folder: no server file (issue 31).

On the old code `fedmoe-export` needed `--job runs/.../server/<job>/job.json`, the server's file, which a
bank's IT got only with `docker cp` from the operator's volume. Now every bank writes the run config it
took part under into its own job folder (once: fedmoe.fl_client.bank.record_job), refuses any later
message of the job that carries another config, and `fedmoe-export --job-id` reads that record.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from local_grid import LocalGrid
from test_secagg_rounds import JOB, banks, keys, run_config, run_job  # noqa: F401

from fedmoe.fl_client.bank import Bank
from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.export import main as export
from fedmoe.model.checkpoint import load_pretrained
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.federation]


def test_a_bank_exports_the_job_from_its_own_folder_with_no_server_file(tmp_path, keys):  # noqa: F811
    config = run_config(tmp_path, **{"num-rounds": 1})
    state = run_job(tmp_path, LocalGrid(banks(3), config), config)
    assert state.finished and state.rounds[0].aggregated
    job = JobConfig.from_run_config(config)
    for bank in ("bank-0", "bank-1", "bank-2"):  # each bank's own record: what its messages carried
        record = tmp_path / "banks" / bank / "jobs" / JOB / "job.json"
        assert json.loads(record.read_text(encoding="utf-8")) == job.to_run_config()
    shutil.rmtree(tmp_path / "server")  # nothing of the server's is read
    node = f"bank-id='bank-1' state-dir='{tmp_path / 'banks' / 'bank-1'}'"
    out = tmp_path / "bank-1-export"
    assert export(["--job-id", JOB, "--node-config", node, "--out", str(out)]) == 0
    bank = Bank(
        job, BankConfig.from_node_config({"bank-id": "bank-1", "state-dir": str(tmp_path / "banks" / "bank-1")}, job)
    )
    assert bank.state.applied_round == 1  # the closing message delivered the last aggregate
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert (load_pretrained(out / "merged").eval()(tokens) - bank.model.eval()(tokens)).abs().max() < 1e-4


def test_a_server_cannot_change_the_job_a_bank_recorded(tmp_path):
    from fedmoe.fl_client.bank import record_job

    job = JobConfig.from_run_config(run_config(tmp_path))
    bank = BankConfig.from_node_config({"bank-id": "bank-0", "state-dir": str(tmp_path / "bank-0")}, job)
    path = record_job(job, bank)
    before = path.read_bytes()
    assert (
        record_job(replace(job, num_rounds=5, round_timeout=30.0, rejoin_grace=5.0), bank) == path
    )  # a resubmission may
    with pytest.raises(ConfigError, match=r"changes \['lr: 0.01 -> 0.5'\]") as err:
        record_job(replace(job, lr=0.5), bank)
    assert str(path) in str(err.value) and path.read_bytes() == before
    # a run config file that is not the bank's job is refused by the export too, naming the key
    other = tmp_path / "job.json"
    other.write_text(json.dumps(replace(job, seed=7).to_run_config()), encoding="utf-8")
    node = f"bank-id='bank-0' state-dir='{tmp_path / 'bank-0'}'"
    assert export(["--job", str(other), "--node-config", node, "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    assert export(["--job-id", "never-ran", "--node-config", node, "--out", str(tmp_path / "y")]) == 2


def test_what_a_resubmission_may_change_names_run_config_keys_only():
    """One list (fedmoe.protocol.config) for the server's state and the bank's record; a typo in it
    would silently let that key change under a running job."""
    from fedmoe.protocol.config import RESUBMIT_MAY_CHANGE, JobConfig

    assert RESUBMIT_MAY_CHANGE < set(JobConfig().to_run_config())
