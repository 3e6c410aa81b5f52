"""End-to-end federations on 127.0.0.1: real SuperLink, SuperNodes, executors, DP-SGD and CKKS.

These start real Flower processes (fedmoe.fl_server.launch), so they are the slowest tests in the suite.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from local_grid import keeping_deltas

from fedmoe.audit.verify import audit_ledgers
from fedmoe.crypto import ExpectedHeader, decrypt_mean, load_secret_context
from fedmoe.crypto.identity import load_pins
from fedmoe.crypto.keys import SECRET_FILE
from fedmoe.fl_client.config import JobConfig
from fedmoe.fl_client.state import load_tensors
from fedmoe.fl_server.launch import job_paths, loopback
from fedmoe.protocol.config import PINS_FILE

pytestmark = [pytest.mark.slow, pytest.mark.federation]

TINY_JOB = {
    "aggregation": "ckks",  # these two decrypt CKKS aggregates; secure aggregation: test_secagg_loopback
    "model-preset": "tiny",
    "local-steps": 3,
    "records-per-bank": 240,
    "seq-len": 48,
    "batch-size": 16,
}


ROOT = Path(__file__).resolve().parents[2]
# The demo's bank policy: the strict defaults, releasing plain losses (so eval loss can be checked).
POLICY = str(ROOT / "deploy" / "demo-bank-policy.toml")


def policies(n: int, keep_deltas_in: Path | None = None) -> dict[str, str]:
    """The demo policy for n banks; with a folder, + keep-plaintext-deltas written there (for tests that
    compare aggregates with the banks' kept deltas: only a bank policy may ask for them)."""
    policy = keeping_deltas(POLICY, keep_deltas_in) if keep_deltas_in is not None else POLICY
    return dict.fromkeys((f"bank-{i}" for i in range(n)), policy)


def job_dir(root: Path, bank: str, job: JobConfig) -> Path:
    """A bank's per-job state (the launcher's node-config state-dir is <root>/banks/<bank>)."""
    return root / "banks" / bank / "jobs" / job.job_id


def free_port_block(size: int = 200) -> int:
    """A base port whose block [base, base + size) looks free (SuperLink + SuperNodes)."""
    for base in range(20000 + (os.getpid() % 50) * 400, 60000, 400):
        ok = True
        for port in (base, *range(base + 100, base + 110)):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


def job_config(root: Path, **overrides: object) -> tuple[dict[str, object], JobConfig]:
    run_config = {**TINY_JOB, **job_paths(root), **overrides}
    return run_config, JobConfig.from_run_config(run_config)


def read_state(job: JobConfig) -> dict:
    path = Path(job.server_state_dir) / job.job_id / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def assert_processes_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.2)
    assert not alive, f"processes still running: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; its parent (this test) has just not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


def test_two_banks_two_rounds_private_and_encrypted(tmp_path):
    run_config, job = job_config(tmp_path, **{"job-id": "e2e", "num-rounds": 2, "min-banks": 2})
    with loopback(2, tmp_path, base_port=free_port_block(), policy_files=policies(2, tmp_path)) as deployment:
        pids = [p.pid for p in deployment.processes.values()]
        result = deployment.flwr_run(run_config, timeout=540)
    assert result.returncode == 0
    assert_processes_gone(pids)

    state = read_state(job)
    assert state["finished"] and state["completed_round"] == 2
    banks = ["bank-0", "bank-1"]
    assert all(r["participants"] == banks and r["aggregated"] for r in state["rounds"]), state["rounds"]

    # The aggregate equals the sample-weighted mean of the plaintext deltas the banks sent, and
    # each bank's replica is the start model plus the decrypted aggregates.
    key = load_secret_context(tmp_path / "keys" / SECRET_FILE)
    server_dir = Path(job.server_state_dir) / job.job_id
    bank_dirs = {b: job_dir(tmp_path, b, job) for b in banks}
    layout = json.loads((server_dir / "results.json").read_text())
    means = []
    for round_idx in (1, 2):
        bundle = (server_dir / "aggregates" / f"round-{round_idx:04d}.bundle").read_bytes()
        expected = ExpectedHeader(key.key_id, key.epoch, round_idx, layout["layout-hash"], layout["n-elements"])
        mean, total_weight = decrypt_mean(bundle, key, expected=expected)
        sent = {b: load_tensors(bank_dirs[b] / "deltas" / f"round-{round_idx:04d}.safetensors") for b in banks}
        weights = {b: float(sent[b]["weight"][0]) for b in banks}
        plain = sum(weights[b] * sent[b]["delta"].double() for b in banks) / sum(weights.values())
        assert abs(total_weight - sum(weights.values())) < 1e-3
        assert np.abs(mean - plain.numpy()).max() < 1e-5
        assert np.abs(plain.numpy()).max() > 1e-4  # the banks really moved
        means.append(torch.from_numpy(mean).double())
    for b in banks:
        bank_state = json.loads((bank_dirs[b] / "state.json").read_text())
        assert bank_state["applied_round"] == 2

    assert_private_and_audited(tmp_path, server_dir, banks, job)

    # Eval loss after round 2 is below round 0 for both banks.
    for b in banks:
        assert state["rounds"][-1]["eval_loss"][b] < state["eval_round0"][b]

    # The server's state dir and every log hold no secret key and no plaintext update.
    secret_payload = (tmp_path / "keys" / SECRET_FILE).read_bytes()[-4096:]
    delta_bytes = [
        load_tensors(bank_dirs[b] / "deltas" / "round-0001.safetensors")["delta"].numpy()[:64].tobytes() for b in banks
    ]
    for path in files_under(server_dir, tmp_path / "logs"):
        data = path.read_bytes()
        assert secret_payload not in data, path
        assert b'"secret"' not in data[:200] or path.suffix != ".ckks", path
        for needle in delta_bytes:
            assert needle not in data, f"plaintext delta bytes found in {path}"
    assert not list(server_dir.rglob("*secret*"))


def assert_private_and_audited(root: Path, server_dir: Path, banks: list[str], job: JobConfig) -> None:
    """Every bank trained both rounds under DP with CSPRNG noise within its budget, as its signed
    ledger says; the privacy officer's audit of all ledgers (pinned keys, epsilon recomputed) passes."""
    ledgers = sorted(root.glob("banks/*/privacy/*/ledger.jsonl"))
    mirrors = sorted((server_dir / "ledger-mirror").glob("*.jsonl"))
    assert len(ledgers) == len(banks) and len(mirrors) == len(banks), (ledgers, mirrors)
    for path in ledgers:
        entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert [(e["job_id"], e["round"], e["status"]) for e in entries] == [(job.job_id, 1, "trained"),
                                                                              (job.job_id, 2, "trained")]  # fmt: skip
        for e in entries:
            assert e["noise_source"] == "csprng" and e["secure_mode"] and e["poisson_sampling"], e
            assert e["noise_multiplier"] > 0 and 0 < e["sample_rate"] < 1 and e["signature"], e
            assert e["epsilon_before"] < e["epsilon"] <= e["budget_epsilon"], e
        assert entries[0]["epsilon_before"] == 0 and entries[1]["epsilon_before"] == entries[0]["epsilon"]
    audit = audit_ledgers([*ledgers, *mirrors], pins=load_pins(root / "keys" / PINS_FILE))
    assert audit.ok and audit.pins_checked, [str(f) for f in audit.errors]
    assert sorted(b.bank_id for b in audit.banks) == banks
    for summary in audit.banks:
        assert summary.ok and summary.rounds_trained == (1, 2), summary
        assert 0 < summary.epsilon_spent <= summary.budget
        assert summary.epsilon_pld == pytest.approx(summary.epsilon_recorded, rel=0.02, abs=0.02)


def wait_for(predicate, timeout: float, what: str, diagnose=None) -> None:
    """Polls `predicate`; on timeout fails with `diagnose()` (what the processes last said) attached."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{diagnose()}" if diagnose else ""))


def last_words(deployment, job: JobConfig, lines: int = 4) -> str:
    """The server's saved state and the last lines of every process log: why a federation test waited."""
    state = read_state(job)
    out = [
        f"server state: completed_round={state.get('completed_round')} finished={state.get('finished')} "
        f"end_reason={state.get('end_reason')!r}"
    ]
    for log in sorted(deployment.log_dir.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        out += [f"{log.stem}: {line[:160]}" for line in tail]
    submitted = (deployment.log_dir / "flwr-run.log").read_text(errors="replace")
    runs = re.findall(r"Successfully started run (\d+)", submitted)
    if runs:  # the last ServerApp's own log (it goes to the SuperLink, not to a file here)
        flwr = Path(sys.executable).parent / "flwr"
        shown = subprocess.run(
            [str(flwr), "log", runs[-1], "fedmoe-loopback", "--show"],
            env=deployment.env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        out += [f"serverapp run {runs[-1]}: {line[:200]}" for line in (shown.stdout + shown.stderr).splitlines()[-25:]]
    return "\n".join(out)


def test_bank_killed_mid_round_and_server_restart_resume(tmp_path):
    run_config, job = job_config(
        tmp_path,
        **{
            "job-id": "chaos",
            "num-rounds": 2,
            "min-banks": 2,
            "round-timeout": 240.0,
            "evaluate": False,
            "rejoin-grace": 5.0,
        },  # bank-2 never comes back: the resumed server waits this long once
    )
    with loopback(3, tmp_path, base_port=free_port_block(), policy_files=policies(3, tmp_path)) as deployment:
        pids = [p.pid for p in deployment.processes.values()]
        submit = deployment.flwr_run(run_config, timeout=120, stream=False)
        assert submit.returncode == 0

        # Kill bank-2's SuperNode and executor once its round-1 train message has arrived.
        bank2_log = deployment.log_dir / "bank-2.log"
        wait_for(
            lambda: "Receiving: train message" in bank2_log.read_text(errors="replace"), 240, "bank-2 train message"
        )
        deployment.kill("bank-2-apps")
        deployment.kill("bank-2")

        # Round 1 completes with the two other banks and says why bank-2 is missing.
        wait_for(
            lambda: read_state(job).get("completed_round") == 1,
            300,
            "round 1 to complete",
            diagnose=lambda: last_words(deployment, job),
        )
        round1 = read_state(job)["rounds"][0]
        assert round1["participants"] == ["bank-0", "bank-1"] and round1["aggregated"]
        assert any("bank-2" in who or "node-" in who for who in round1["left_out"]), round1["left_out"]

        # Restart the server side (SuperLink + ServerApp executor) after round 1: a fresh run of
        # the same job resumes from the saved state and finishes round 2.
        deployment.kill("serverapp")
        deployment.kill("superlink")
        deployment.restart("superlink")
        deployment.restart("serverapp")
        resubmit = deployment.flwr_run(run_config, timeout=120, stream=False)
        assert resubmit.returncode == 0
        wait_for(
            lambda: read_state(job).get("finished", False),
            300,
            "the resumed job to finish",
            diagnose=lambda: last_words(deployment, job),
        )
        pids += [p.pid for p in deployment.processes.values()]

    assert_processes_gone(pids)
    state = read_state(job)
    assert state["completed_round"] == 2 and [r["round"] for r in state["rounds"]] == [1, 2]
    assert state["rounds"][1]["participants"] == ["bank-0", "bank-1"]
    missing = [who for who in state["rounds"][0]["left_out"] if who != "(round)"]
    assert missing and all(state["rounds"][1]["left_out"].get(who) == "not connected" for who in missing)
    for b in ("bank-0", "bank-1"):
        bank_state = json.loads((job_dir(tmp_path, b, job) / "state.json").read_text())
        # no round trained twice, whatever the restarts (a repeated request gets the same release)
        assert bank_state["rounds_trained"] == [1, 2] and bank_state["applied_round"] == 2
    # nothing from the first (killed) server run is left behind either
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not leftover, leftover
