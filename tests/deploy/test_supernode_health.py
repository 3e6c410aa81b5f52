"""A bank's SuperNode health tells the truth (issue 31), checked on real Flower processes.

Healthy only while its pulls reach the SuperLink: not before it connected, not after the SuperLink
is gone. A SuperNode the SuperLink refuses (401: its clock is off, here by faketime) says why and
exits non-zero instead of "terminated gracefully" with 0.
"""

from __future__ import annotations

import shutil
import socket
import time

import pytest

from fedmoe.fl_client.supernode import EXIT_REFUSED, alive_within
from fedmoe.fl_server import deploy
from fedmoe.fl_server.deploy import loopback_topology
from fedmoe.fl_server.launch import Deployment, ensure_keys, ensure_tls, flwr_env

pytestmark = [pytest.mark.federation, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def test_health_is_red_before_the_superlink_and_after_it_is_gone(tmp_path, monkeypatch):
    root = tmp_path.resolve()
    alive = root / "bank-0.alive"
    monkeypatch.setitem(deploy.SERVICE_ENV, "bank-0", {"FEDMOE_SUPERNODE_ALIVE": str(alive)})
    ensure_keys(root / "keys")
    topo = loopback_topology(1, root=str(root), key_path=str(root / "keys" / "k"), base_port=_free_port())
    deployment = Deployment(topo, root, flwr_env(root, topo.superlink_address))
    try:
        deployment.start_service("bank-0", deploy.service_commands(topo)["bank-0"])  # SuperLink not up yet
        time.sleep(8)
        assert not alive_within(30, str(alive)), "healthy before it ever reached a SuperLink"
        deployment.restart("superlink")
        assert _wait(lambda: alive_within(5, str(alive)), 60), (root / "logs" / "bank-0.log").read_text()[-2000:]
        deployment.kill("superlink")
        assert _wait(lambda: not alive_within(5, str(alive)), 30), "still healthy with its SuperLink gone"
    finally:
        deployment.stop()


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime (apt-get install faketime; .ci/run does)")
def test_a_refused_supernode_says_why_and_exits_non_zero(tmp_path, monkeypatch):
    root = tmp_path.resolve()
    ensure_keys(root / "keys")
    tls_dir, auth_dir = ensure_tls(root, 1)
    topo = loopback_topology(
        1, root=str(root), key_path=str(root / "keys" / "k"), base_port=_free_port(), tls_dir=tls_dir, auth_dir=auth_dir
    )
    deployment = Deployment(topo, root, flwr_env(root, topo.superlink_address, topo.ca_path))
    try:
        deployment.restart("superlink")
        deployment.register_banks(["bank-0"])
        monkeypatch.setitem(deploy.SERVICE_ENV, "bank-0", {"FAKETIME": "+5m", "LD_PRELOAD": _libfaketime()})
        argv = deploy.service_commands(topo)["bank-0"]
        process = deployment.start_service("bank-0", argv)
        process.wait(timeout=120)
        log = (root / "logs" / "bank-0.log").read_text(errors="replace")
        assert process.returncode == EXIT_REFUSED, log[-3000:]  # Flower alone: "terminated gracefully", exit 0
        assert "401 Unauthorized" in log and "clock" in log and "registered" in log, log[-3000:]
    finally:
        deployment.stop()


def _libfaketime() -> str:
    import glob

    found = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    if not found:
        pytest.fail("faketime is installed but libfaketime.so.1 was not found")
    return found[0]


def test_a_killed_supernode_rejoins_at_once_with_its_registered_key(tmp_path, monkeypatch):
    """Killed without signing off, its key's old session stays online at the SuperLink: flwr 1.42
    refuses to activate it again (2004) and the SuperNode exited, so a restarted bank missed rounds."""
    root = tmp_path.resolve()
    alive = root / "bank-0.alive"
    monkeypatch.setitem(deploy.SERVICE_ENV, "bank-0", {"FEDMOE_SUPERNODE_ALIVE": str(alive)})
    ensure_keys(root / "keys")
    tls_dir, auth_dir = ensure_tls(root, 1)
    topo = loopback_topology(
        1, root=str(root), key_path=str(root / "keys" / "k"), base_port=_free_port(), tls_dir=tls_dir, auth_dir=auth_dir
    )
    deployment = Deployment(topo, root, flwr_env(root, topo.superlink_address, topo.ca_path))
    argv = deploy.service_commands(topo)["bank-0"]
    try:
        deployment.restart("superlink")
        deployment.register_banks(["bank-0"])
        deployment.start_service("bank-0", argv)
        assert _wait(lambda: alive_within(3, str(alive)), 60), (root / "logs" / "bank-0.log").read_text()[-2000:]
        deployment.kill("bank-0")  # SIGKILL: no deactivation reaches the SuperLink
        alive.unlink()
        restarted = deployment.start_service("bank-0", argv)
        back = _wait(lambda: alive_within(3, str(alive)), 60)
        log = (root / "logs" / "bank-0.log").read_text(errors="replace")
        assert back and restarted.poll() is None, log[-3000:]
    finally:
        deployment.stop()
