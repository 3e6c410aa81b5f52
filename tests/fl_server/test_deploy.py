"""docker-compose.yml: valid for docker-compose, current, in sync with the loopback launcher and the
kits, hardened (TLS, SuperNode auth, non-root, healthchecks, restart, telemetry off, secrets per service)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fedmoe.fl_server.deploy import FLOWER_ENV, compose_topology, loopback_topology, render_compose, service_commands

REPO = Path(__file__).resolve().parents[2]
# Flags whose values are deployment data (hosts, ports, paths); everything else must be identical.
VALUE_FLAGS = {
    "--host",
    "--port",
    "--superlink",
    "--runtime-api-address",
    "--database",
    "--node-config",
    "--ssl-certfile",
    "--ssl-keyfile",
    "--ssl-ca-certfile",
    "--root-certificates",
    "--auth-supernode-private-key",
    "--superexec-auth-secret-file",
    "--health-server-address",
}


def compose_config(name: str = "docker-compose.yml") -> dict:
    """What docker-compose itself makes of the file (fails the test if it rejects it)."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose (Debian package) is not installed; .ci/run installs it")
    out = subprocess.run(
        ["docker-compose", "-f", str(REPO / name), "config"], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def raw() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def shape(argv: list[str]) -> list[str]:
    return [("<value>" if i and argv[i - 1] in VALUE_FLAGS else arg) for i, arg in enumerate(argv)]


def test_compose_file_is_current():
    # A string compare: runs without docker-compose (a skipped validity check must not hide a stale file).
    assert (REPO / "docker-compose.yml").read_text() == render_compose(3), "stale: fedmoe compose > docker-compose.yml"


def test_compose_file_is_valid():
    config = compose_config()
    commands = service_commands(compose_topology(3))
    for service, argv in commands.items():
        assert config["services"][service]["command"] == argv, service
    assert not (REPO / "docker-compose.tls.yml").exists()  # TLS is the only compose variant


def test_compose_and_loopback_run_the_same_commands():
    compose = service_commands(compose_topology(3))
    loopback = service_commands(loopback_topology(3, root="/r", key_path="/r/keys/k", tls_dir="/c", auth_dir="/a"))
    assert list(compose) == list(loopback)
    for service in compose:
        assert shape(compose[service]) == shape(loopback[service]), service
    assert "--disable-runtime-dependency-installation" in compose["superlink"]
    for i in range(3):
        assert (
            f"bank-id='bank-{i}' partition-id={i}"
            in compose[f"bank-{i}"][compose[f"bank-{i}"].index("--node-config") + 1]
        )


def test_every_compose_deployment_authenticates_supernodes():
    services = raw()["services"]
    assert "--enable-supernode-auth" in services["superlink"]["command"]
    assert "--insecure" not in services["superlink"]["command"]
    for i in range(3):
        cmd = services[f"bank-{i}"]["command"]
        assert "--auth-supernode-private-key" in cmd and "--root-certificates" in cmd
    # the SuperLink is published on the operator's loopback only
    assert all(p.startswith("127.0.0.1:") for p in services["superlink"]["ports"])


def test_secrets_reach_only_the_service_that_owns_them():
    spec = raw()
    services, secrets = spec["services"], spec["secrets"]

    def mounted(service: str) -> set[str]:
        return {s["source"] for s in services[service].get("secrets", [])}

    assert mounted("superlink") == {"ca-cert", "superlink-cert", "superlink-key", "server-exec-secret"}
    assert mounted("serverapp") == {"ca-cert", "server-exec-secret"}
    for i in range(3):
        assert mounted(f"bank-{i}") == {"ca-cert", f"bank-{i}-node-key", f"bank-{i}-exec-secret"}
        assert mounted(f"bank-{i}-apps") == {f"bank-{i}-exec-secret"}
        assert secrets[f"bank-{i}-node-key"]["file"].endswith(f"kits/bank-{i}/secrets/node.key")
    assert "ca.key" not in yaml.safe_dump(spec)  # the CA's private key is in no deployment


def test_secret_key_only_reaches_bank_executors():
    services = raw()["services"]

    def volumes(service: str) -> set[str]:
        return {v.split(":")[0] for v in services[service].get("volumes", [])}

    keygen = services["keygen"]["command"][-1]
    installs = {step.split()[-1].strip("/"): step for step in keygen.split(" && ") if step.startswith("install")}
    assert set(installs) == {"out/bank-0", "out/bank-1", "out/bank-2", "out/server"}
    for i in range(3):
        step = installs[f"out/bank-{i}"]
        assert "-m 600" in step and "context.secret.ckks" in step and "context.secret.bfv" in step
        assert f"bank-{i}.identity.secret" in step
        assert not any(f"bank-{j}.identity" in step for j in range(3) if j != i)  # only its own identity
    assert "secret" not in installs["out/server"] and "context.public.bfv" in installs["out/server"]
    assert "/ceremony" in services["keygen"]["tmpfs"][0]
    assert not any("bank-" in v and "keys" in v for v in volumes("serverapp") | volumes("superlink"))
    for i in range(3):
        mine = volumes(f"bank-{i}-apps")
        assert f"bank-{i}-keys" in mine
        assert not any(f"bank-{j}-keys" in v for v in mine for j in range(3) if j != i)
        assert "server-keys" not in mine
        assert not any("keys" in v for v in volumes(f"bank-{i}"))  # the SuperNode never sees the key


def test_hardening():
    services = raw()["services"]
    long_running = [s for s in services if s not in ("keygen", "register")]
    for name in long_running:
        svc = services[name]
        assert svc["user"] == "10001:10001", name
        assert svc["restart"] == "unless-stopped", name
        assert "healthcheck" in svc, name
        assert svc["environment"]["FLWR_TELEMETRY_ENABLED"] == "0", name
        assert "network_mode" not in svc, name  # no executor stranded in a dead namespace
    for i in range(3):
        apps = services[f"bank-{i}-apps"]
        assert apps["networks"] == [f"bank-{i}-net"]  # the executor's only network is the bank's own
        # started, not healthy: a SuperNode is healthy only once connected, and the bank's `up -d` must not
        # depend on the operator's SuperLink being up (SuperNode before SuperLink, walked with Docker)
        assert apps["depends_on"][f"bank-{i}"]["condition"] == "service_started"
        assert f"bank-{i}:" in " ".join(apps["command"])  # finds its SuperNode by name after a restart
    assert raw()["networks"]["bank-0-net"]["internal"] is True
    assert FLOWER_ENV["FLWR_TELEMETRY_ENABLED"] == "0"


def test_dockerignore_keeps_secrets_and_state_out_of_the_build():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("**")] == "**"  # deny by default, then allow sources by name
    for pattern in ("**/*.ckks", "**/*.key", "**/*.pem", "**/*.secret*"):
        assert pattern in lines
    assert not any(line.startswith("!") and (".venv" in line or "runs" in line or "kits" in line) for line in lines)
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL" in dockerfile and "USER 10001" in dockerfile
