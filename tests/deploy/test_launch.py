"""fedmoe.fl_server.launch: refuses what cannot work before starting anything, reports failed jobs with a
non-zero exit and the failing component's error, stops every process on SIGTERM, logs without ANSI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmoe.fl_server.launch import LaunchError, check_run_config, job_defaults, main, parse_run_config

REPO = Path(__file__).resolve().parents[2]
TINY = (
    'model-preset="tiny" num-rounds=1 local-steps=2 records-per-bank=120 seq-len=32 batch-size=8 '
    "evaluate=false dp=false min-banks=2"
)


def free_base_port() -> int:
    import socket

    for base in range(30000 + (os.getpid() % 40) * 300, 60000, 300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", base)) != 0:
                return base
    raise RuntimeError("no free port")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--banks", "0"], "min-banks"),
        (["--banks", "1", "--run-config", "min-banks=2"], "min-banks=2"),
        (["--banks", "2", "--run-config", "min-banks=3"], "min-banks=3"),
        (["--banks", "2", "--run-config", "num-round=2"], "'num-round'"),
        (["--banks", "2", "--run-config", 'num-rounds="two"'], "'num-rounds'"),
        (["--banks", "2", "--run-config", "min-banks=2", "--data", "bank-0=/no/train.jsonl"], "is not a file"),
        (["--banks", "2", "--run-config", "min-banks=2", "--data", "bank-7=/etc/hostname"], "no bank 'bank-7'"),
    ],
)
def test_refused_up_front_with_the_reason(tmp_path, capsys, argv, needle):
    code = main([*argv, "--root", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert not (tmp_path / "r" / "logs").exists()  # nothing was started


def test_run_config_key_errors_name_the_key():
    defaults = job_defaults()
    with pytest.raises(LaunchError, match="'local-step'.*local-steps"):
        check_run_config(parse_run_config("local-step=3"), defaults)
    with pytest.raises(LaunchError, match="'dp': expected bool"):
        check_run_config(parse_run_config("dp=1"), defaults)
    check_run_config(parse_run_config('lr=1 model-preset="tiny" dp=false'), defaults)  # int for float is fine


def _tree_pids(marker: str) -> list[int]:
    """PIDs of every process whose command line mentions `marker` (the test's own folder)."""
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...), from /proc."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _launch(root: Path, port: int, run_config: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedmoe.fl_server.launch",
            "--banks",
            "2",
            "--root",
            str(root),
            "--port",
            str(port),
            "--run-config",
            run_config,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.federation
def test_sigterm_stops_every_process(tmp_path):
    root = tmp_path / "fed"
    launcher = _launch(root, free_base_port(), f'{TINY} job-id="term" num-rounds=50')
    deadline = time.monotonic() + 180
    run_log = root / "logs" / "flwr-run.log"
    while time.monotonic() < deadline and "Successfully started run" not in (
        run_log.read_text(errors="replace") if run_log.exists() else ""
    ):
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.5)
    pids = _descendants(launcher.pid)
    assert len(pids) >= 6, pids  # superlink, serverapp, 2 x (supernode + executor), flwr run, apps
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGTERM, err
    time.sleep(1)
    left = [p for p in pids if _alive(p)] + [p for p in _tree_pids(str(root)) if _alive(p)]
    assert not left, f"processes left after SIGTERM: {left}"
    for log in (root / "logs").glob("*.log"):
        assert b"\x1b[" not in log.read_bytes(), f"ANSI colour codes in {log}"


@pytest.mark.slow
@pytest.mark.federation
def test_failed_job_exits_non_zero_with_the_servers_error(tmp_path):
    root = tmp_path / "fed"
    # valid key and type for Flower, but no such preset: the ServerApp raises while building the model
    launcher = _launch(root, free_base_port(), f'{TINY} job-id="bad" model-preset="no-such-preset"')
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 1, out + err
    assert "no-such-preset" in err or "ServerApp" in err, err
    assert not [p for p in _tree_pids(str(root)) if _alive(p)]


class _StubDeployment:
    """What job_outcome asks a deployment: Flower's run status and a service's last error."""

    def __init__(self, status: str, log_dir: Path) -> None:
        self.status, self.log_dir = status, log_dir

    def run_status(self, run_id: int) -> dict[str, str]:
        return {"status": self.status, "status-details": "ServerApp failed with exception: boom"}

    def last_error(self, service: str) -> str:
        return "ERROR : Traceback ... boom"


def _submitted(rc: int = 0) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], rc, stdout="Successfully started run 42\n")


def test_job_outcome_names_what_failed(tmp_path):
    from fedmoe.fl_server.launch import job_outcome

    config = {"server-state-dir": str(tmp_path), "job-id": "j"}
    failed = job_outcome(_StubDeployment("finished:failed", tmp_path), _submitted(), config)
    assert "finished:failed" in failed and "boom" in failed
    assert "submitting the job failed" in job_outcome(_StubDeployment("x", tmp_path), _submitted(1), config)
    ok = _StubDeployment("finished:completed", tmp_path)
    assert "wrote no state" in job_outcome(ok, _submitted(), config)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "state.json").write_text(
        '{"finished": false, "end_reason": "only 1 bank(s) connected before round 1, min-banks 2"}'
    )
    assert "only 1 bank(s) connected" in job_outcome(ok, _submitted(), config)
    (tmp_path / "j" / "state.json").write_text('{"finished": true, "end_reason": "completed 2 rounds"}')
    assert job_outcome(ok, _submitted(), config) == ""
    # never "completed" over a quarantined or missing last aggregate
    (tmp_path / "j" / "state.json").write_text(
        '{"finished": true, "end_reason": "completed 2 rounds; aggregate(s) [2] quarantined", '
        '"rounds": [{"aggregated": true}, {"aggregated": false}]}'
    )
    assert "no valid final model" in job_outcome(ok, _submitted(), config)


def test_missing_public_context_is_refused(tmp_path):
    from fedmoe.crypto.keys import PUBLIC_FILE
    from fedmoe.fl_server.launch import ensure_keys

    ensure_keys(tmp_path / "keys")
    (tmp_path / "keys" / PUBLIC_FILE).unlink()
    with pytest.raises(LaunchError, match=PUBLIC_FILE):
        ensure_keys(tmp_path / "keys")


def test_data_and_policy_reach_the_banks_node_config():
    from fedmoe.fl_server.deploy import loopback_topology, service_commands

    topo = loopback_topology(
        2, root="/r", key_path="/r/k", data_paths={"bank-0": "/d/b0.jsonl"}, policy_files={"bank-1": "/p/b1.toml"}
    )
    cmds = service_commands(topo)
    node_config = {b: cmds[b][cmds[b].index("--node-config") + 1] for b in ("bank-0", "bank-1")}
    assert "data-path='/d/b0.jsonl'" in node_config["bank-0"] and "data-path" not in node_config["bank-1"]
    assert "policy-file='/p/b1.toml'" in node_config["bank-1"] and "policy-file" not in node_config["bank-0"]


def test_a_simulation_never_submits_to_another_federations_superlink(tmp_path):
    """Found running `make simulation` while a demo ran: it waited for 'its' SuperLink's port, found the
    demo's open, and submitted its job to the demo's banks (which refused it: another BFV key)."""
    import socket

    from fedmoe.fl_server.deploy import loopback_topology
    from fedmoe.fl_server.launch import Deployment, flwr_env

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        topo = loopback_topology(3, root=str(tmp_path), key_path=str(tmp_path / "k"), base_port=port)
        deployment = Deployment(topo, tmp_path, flwr_env(tmp_path, topo.superlink_address), simulated_banks=3)
        with pytest.raises(LaunchError, match=f"port {port} .* already in use"):
            deployment.start(simulation=True)
        assert "superlink" not in deployment.processes
