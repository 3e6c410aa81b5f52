"""SuperNode authentication (an unregistered SuperNode cannot join) and the bank's app gate (an
app bundle the bank did not approve is refused before any of its code is unpacked or imported)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmoe.fl_client import app_gate as gate
from fedmoe.fl_client.executor import WarmClientApps
from fedmoe.fl_server.deploy import loopback_topology, service_commands
from fedmoe.fl_server.launch import Deployment, ensure_keys, ensure_tls, flwr_env

REPO = Path(__file__).resolve().parents[2]


def build_fab(app: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app)


@pytest.fixture
def evil_app(tmp_path) -> Path:
    """A Flower app whose import would leave a marker file: proof that its code ran."""
    app = tmp_path / "evil"
    (app / "evil").mkdir(parents=True)
    marker = tmp_path / "code-ran"
    (app / "evil" / "__init__.py").write_text("")
    (app / "evil" / "client.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from flwr.clientapp import ClientApp\napp = ClientApp()\n"
    )
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "mallory"\n\n[tool.flwr.app.components]\n'
        'serverapp = "evil.client:app"\nclientapp = "evil.client:app"\n\n[tool.flwr.app.config]\nx = 1\n'
    )
    return app


def test_gate_refuses_unapproved_bundle_before_install(tmp_path, evil_app, monkeypatch):
    """The bank's executor (fedmoe-superexec) checks every task's bundle before installing it."""
    from types import SimpleNamespace

    from flwr.supercore.fab import Fab

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    content = build_fab(evil_app)
    digest = hashlib.sha256(content).hexdigest()
    fab, run = Fab(digest, content, {}), SimpleNamespace(fab_id="mallory/evil", fab_version="1.0.0")
    approved = tmp_path / "approved-apps"
    approved.write_text("# nothing approved yet\n" + "0" * 64 + "  some other release\n")
    marker = tmp_path / "code-ran"
    apps = WarmClientApps(str(approved))
    with pytest.raises(gate.AppNotApproved, match=digest):
        apps.load(run, fab)
    assert not (tmp_path / "flwr-home").exists() and not marker.exists()  # nothing unpacked, nothing ran

    # once the bank approves exactly this bundle it is installed and imported, once
    approved.write_text(f"{digest}  evil 1.0.0, reviewed\n")
    app = apps.load(run, fab)
    assert marker.read_text() == "ran"
    marker.unlink()
    assert apps.load(run, fab) is app and not marker.exists()  # kept loaded: not imported again

    # a withdrawn approval holds from the next task on, without a restart
    approved.write_text("# withdrawn\n")
    with pytest.raises(gate.AppNotApproved):
        apps.load(run, fab)
    for name in [m for m in sys.modules if m.partition(".")[0] == "evil"]:
        del sys.modules[name]


def test_gate_fails_closed(tmp_path, evil_app):
    fab = build_fab(evil_app)
    with pytest.raises(gate.AppNotApproved):
        gate.check_bundle(fab, tmp_path / "missing")  # no file: nothing approved
    (tmp_path / "bad").write_text("not-a-hash\n")
    with pytest.raises(ValueError, match="bad:1"):
        gate.check_bundle(fab, tmp_path / "bad")


def test_rebuilt_bundle_has_the_released_hash(tmp_path):
    """The hash `provision release` prints is the fab-hash `flwr run <staged app>` submits."""
    from fedmoe.fl_server.provision import release

    staged, digest = release(REPO, tmp_path / "release")
    assert hashlib.sha256(build_fab(staged)).hexdigest() == digest
    assert (tmp_path / "release" / "app.sha256").read_text().startswith(digest)


def _free_port() -> int:
    import socket

    for base in range(40000 + (os.getpid() % 40) * 300, 60000, 300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", base)) != 0:
                return base
    raise RuntimeError("no free port")


@pytest.mark.slow
@pytest.mark.federation
def test_unregistered_supernode_cannot_join(tmp_path):
    root = tmp_path.resolve()
    ensure_keys(root / "keys")
    tls_dir, auth_dir = ensure_tls(root, 2)
    topo = loopback_topology(
        2, root=str(root), key_path=str(root / "keys" / "k"), base_port=_free_port(), tls_dir=tls_dir, auth_dir=auth_dir
    )
    assert "--enable-supernode-auth" in service_commands(topo)["superlink"]
    deployment = Deployment(topo, root, flwr_env(root, topo.superlink_address, topo.ca_path))
    try:
        deployment.restart("superlink")
        deployment.register_banks(["bank-0"])  # bank-1's key is never registered
        deployment.restart("bank-0")
        try:
            deployment.restart("bank-1")
        except RuntimeError as refused:  # it may be turned away before its own port is even seen listening
            assert "exited with code" in str(refused), refused
        flwr = [
            str(Path(os.sys.executable).parent / "flwr"),
            "supernode",
            "list",
            "fedmoe-loopback",
            "--format",
            "json",
        ]
        nodes: list = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(flwr, capture_output=True, text=True, env=deployment.env, cwd=root)
            nodes = json.loads(out.stdout).get("nodes", []) if out.stdout.strip().startswith("{") else []
            online = [n for n in nodes if "online" in json.dumps(n).lower()]
            if online:
                break
            time.sleep(1)
        time.sleep(5)  # give bank-1 every chance to get in
        out = subprocess.run(flwr, capture_output=True, text=True, env=deployment.env, cwd=root)
        nodes = json.loads(out.stdout)["nodes"]
        bank1_log = (root / "logs" / "bank-1.log").read_text(errors="replace")
        assert len(nodes) == 1, nodes  # only the registered key is known to the SuperLink
        assert "online" in json.dumps(nodes[0]).lower(), nodes
        # refused: it exited, or (fedmoe-supernode) it is still retrying activation, saying why
        refused = "rror" in bank1_log or "refused to activate" in bank1_log
        assert deployment.processes["bank-1"].poll() is not None or refused, bank1_log[-2000:]
    finally:
        deployment.stop()
