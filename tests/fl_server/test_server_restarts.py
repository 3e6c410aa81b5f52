"""A server (SuperLink + ServerApp executor) killed twice, each time right after a round's state was
saved, over a real loopback federation: every resubmission resumes and the job finishes with every
round aggregated by every bank (issue 27: "a restart that wedges": once in three tries the banks
received the new run's messages and no executor ran a task again).
"""

from __future__ import annotations

import json
import time

import pytest
from test_federation_e2e import TINY_JOB, free_port_block, job_config, last_words, policies, read_state, wait_for

from fedmoe.fl_server.launch import loopback

pytestmark = [pytest.mark.slow, pytest.mark.federation]

BANKS = ["bank-0", "bank-1", "bank-2"]


def kill_server_when(deployment, job, ready, what: str) -> None:
    """Kills the server side the moment `ready()` holds, then starts it again."""
    deadline = time.monotonic() + 300
    while not ready():
        assert time.monotonic() < deadline, f"never saw {what}\n{last_words(deployment, job)}"
        time.sleep(0.02)
    deployment.kill("serverapp")
    deployment.kill("superlink")
    deployment.restart("superlink")
    deployment.restart("serverapp")


def test_two_server_restarts_right_after_a_round_is_saved_lose_no_round(tmp_path):
    """Secure aggregation (the default); the CKKS path's restart is test_federation_e2e's chaos test."""
    run_config, job = job_config(
        tmp_path,
        **{
            "job-id": "restarts",
            "aggregation": "secagg",
            "num-rounds": 3,
            "min-banks": 3,
            "round-timeout": 120.0,
            "evaluate": False,
            "local-steps": TINY_JOB["local-steps"],
        },
    )
    with loopback(3, tmp_path, base_port=free_port_block(), policy_files=policies(3)) as deployment:
        for restart_after in (None, 1, 2):
            if restart_after is not None:
                saved = lambda r=restart_after: read_state(job).get("completed_round") == r  # noqa: E731
                kill_server_when(deployment, job, saved, f"round {restart_after} saved")
            submit = deployment.flwr_run(run_config, timeout=120, stream=False)
            assert submit.returncode == 0, submit.stdout
        wait_for(
            lambda: read_state(job).get("finished", False),
            400,
            "the job to finish after two restarts",
            diagnose=lambda: last_words(deployment, job, lines=8),
        )
    state = read_state(job)
    print("\n".join(f"round {r['round']}: {r['participants']} {r['no_aggregate']}" for r in state["rounds"]))
    assert [r["round"] for r in state["rounds"]] == [1, 2, 3]
    assert all(r["aggregated"] and r["participants"] == BANKS for r in state["rounds"]), state["rounds"]


def test_a_server_crash_after_every_bank_released_its_masked_input_loses_no_round(tmp_path):
    """The server dies after all three banks trained round 2 and released their masked inputs, before
    it saved the round. The resubmitted job repeats round 2 with the same setup; each bank answers each
    repeated request with the reply it already gave (fedmoe.fl_client.secagg_bank.kept_reply), so round 2
    is aggregated from the releases already made: nobody trains it twice, nobody's ε is lost. (Before:
    every bank answered "already released under other round keys" and round 2 had no aggregate.)"""
    run_config, job = job_config(
        tmp_path,
        **{"job-id": "crash", "aggregation": "secagg", "num-rounds": 3, "min-banks": 3, "round-timeout": 120.0,
           "evaluate": False},
    )  # fmt: skip
    released = [tmp_path / "banks" / b / "jobs" / "crash" / "released" / "round-0002.json" for b in BANKS]
    with loopback(3, tmp_path, base_port=free_port_block(), policy_files=policies(3)) as deployment:
        assert deployment.flwr_run(run_config, timeout=120, stream=False).returncode == 0
        every_bank_released = lambda: all(p.exists() for p in released)  # noqa: E731
        kill_server_when(deployment, job, every_bank_released, "every bank's release of round 2")
        assert read_state(job).get("completed_round") == 1  # the server had not saved round 2
        assert deployment.flwr_run(run_config, timeout=120, stream=False).returncode == 0
        wait_for(
            lambda: read_state(job).get("finished", False),
            400,
            "the resubmitted job to finish",
            diagnose=lambda: last_words(deployment, job, lines=8),
        )
        repeats = {b: (deployment.log_dir / f"{b}-apps.log").read_text(errors="replace") for b in BANKS}
    state = read_state(job)
    assert [r["round"] for r in state["rounds"]] == [1, 2, 3]
    assert all(r["aggregated"] and r["participants"] == BANKS for r in state["rounds"]), state["rounds"]
    for bank in BANKS:  # round 2 was answered from what was already released, and trained once
        assert "round 2 was already released; re-sending it" in repeats[bank], bank
        assert "round 2 was already released under other round keys" not in repeats[bank], bank
        bank_state = json.loads((tmp_path / "banks" / bank / "jobs" / "crash" / "state.json").read_text())
        assert bank_state["rounds_trained"] == [1, 2, 3] and bank_state["applied_round"] == 3, bank_state
