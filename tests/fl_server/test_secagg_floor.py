"""Under secure aggregation a round needs BANK_FLOOR (3) banks whatever `min-banks` says: every bank
refuses fewer. A job with min-banks 2 and two banks connected waits for a third, then stops, resumable,
without starting a round the banks would refuse (the old server ran it, and every bank's refusal
came back as a client error)."""

from __future__ import annotations

from local_grid import KEEP_DELTAS_POLICY, LocalGrid

from fedmoe.fl_server.ceremony import loopback_ceremony
from fedmoe.fl_server.console import SilentReporter
from fedmoe.fl_server.federation import Federation
from fedmoe.protocol.config import JobConfig


def test_two_banks_under_secure_aggregation_start_no_round(tmp_path):
    loopback_ceremony(tmp_path / "keys", ["bank-0", "bank-1"])
    run_config = {
        "job-id": "floor",
        "aggregation": "secagg",
        "min-banks": 2,
        "model-preset": "tiny",
        "synthetic-banks": 2,
        "round-timeout": 1.0,  # how long the server waits for the third bank
        "key-dir": str(tmp_path / "keys"),
        "server-state-dir": str(tmp_path / "server"),
        "bank-state-root": str(tmp_path / "banks"),
    }
    nodes = {100 + i: {"bank-id": f"bank-{i}", "partition-id": i, "policy-file": KEEP_DELTAS_POLICY} for i in range(2)}
    grid = LocalGrid(nodes, run_config)
    state = Federation(grid=grid, job=JobConfig.from_run_config(run_config), reporter=SilentReporter()).run()
    assert state.rounds == [] and not state.finished, state.end_reason
    assert state.end_reason == (
        "only 2 bank(s) connected before round 1, min-banks 2; secure aggregation needs 3 (every bank refuses fewer)"
    )
    assert not [d for d in grid.delivered if "train" in str(d) or "secagg" in str(d)], grid.delivered
