"""The server stops selecting a bank whose budget is spent and ends the job when too few remain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from local_grid import LocalGrid

from fedmoe.crypto import keygen
from fedmoe.fl_server.console import SilentReporter
from fedmoe.fl_server.federation import Federation
from fedmoe.protocol.config import JobConfig


@pytest.mark.slow
def test_exhausted_banks_are_dropped_then_job_ends(tmp_path):
    keygen(tmp_path / "keys")
    run_config = {
        "job-id": "budget",
        "aggregation": "ckks",  # the shared-key path (what this test covers)
        "num-rounds": 3,
        "min-banks": 2,
        "model-preset": "tiny",
        "local-steps": 2,
        "records-per-bank": 160,
        "seq-len": 32,
        "evaluate": False,
        "epsilon": 3.0,
        "key-dir": str(tmp_path / "keys"),
        "server-state-dir": str(tmp_path / "server"),
        "bank-state-root": str(tmp_path / "banks"),
    }
    # bank-2 calibrates its noise for 1 round, bank-1 for 2: they run out after those rounds.
    nodes = {
        100: {"bank-id": "bank-0", "partition-id": 0},
        101: {"bank-id": "bank-1", "partition-id": 1, "planned-rounds": 2},
        102: {"bank-id": "bank-2", "partition-id": 2, "planned-rounds": 1},
    }
    grid = LocalGrid(nodes, run_config)
    job = JobConfig.from_run_config(run_config)
    state = Federation(grid=grid, job=job, reporter=SilentReporter()).run()

    assert [r.participants for r in state.rounds] == [["bank-0", "bank-1", "bank-2"], ["bank-0", "bank-1"]]
    assert "not selected: budget exhausted after round 1" in state.rounds[1].left_out["bank-2"]
    assert set(state.exhausted) == {"bank-1", "bank-2"}
    assert state.completed_round == 2 and "min-banks 2" in state.end_reason
    # bank-2 was never asked to train again: the server did not even send it round 2
    assert (102, "train", "budget-r2") not in grid.delivered

    # every bank stayed within its own budget
    def privacy_file(bank: str, name: str) -> Path:  # the budget is the dataset's: <root>/<bank>/privacy/<fp>/
        [path] = (Path(job.bank_state_root) / bank).glob(f"privacy/*/{name}")
        return path

    for bank in ("bank-0", "bank-1", "bank-2"):
        acc = json.loads(privacy_file(bank, "accountant.json").read_text())
        assert len(acc["history"]) == {"bank-0": 2, "bank-1": 2, "bank-2": 1}[bank]
        for entry in map(json.loads, privacy_file(bank, "ledger.jsonl").read_text().splitlines()):
            assert entry["epsilon"] <= 3.0 + 1e-9, (bank, entry)
    for record in state.rounds:  # the server never saw an epsilon (or anything that gives away n)
        assert all("epsilon-total" not in metrics for metrics in record.train_metrics.values())
    # the banks' ledgers verify, and the server's mirrors say who was received, dropped or skipped
    from fedmoe.protocol.ledger import verify_chain

    mirror_dir = Path(job.server_state_dir) / "budget" / "ledger-mirror"
    for bank in ("bank-0", "bank-1", "bank-2"):
        assert verify_chain(privacy_file(bank, "ledger.jsonl")).ok
        assert verify_chain(mirror_dir / f"{bank}.jsonl").ok
    bank2 = [json.loads(line) for line in (mirror_dir / "bank-2.jsonl").read_text().splitlines()]
    assert [m["server_status"] for m in bank2] == ["received", "skipped"]
