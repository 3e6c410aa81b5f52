"""docker-compose files: valid for docker-compose, in sync with the loopback launcher, keys well placed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fl_server.deploy import compose_topology, loopback_topology, render_compose, service_commands

REPO = Path(__file__).resolve().parents[2]
FILES = {"docker-compose.yml": False, "docker-compose.tls.yml": True}
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
}


def compose_config(name: str) -> dict:
    """What docker-compose itself makes of the file (fails the test if it rejects it)."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose (Debian package) is not installed; .ci/run installs it")
    out = subprocess.run(
        ["docker-compose", "-f", str(REPO / name), "config"], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def shape(argv: list[str]) -> list[str]:
    return [("<value>" if i and argv[i - 1] in VALUE_FLAGS else arg) for i, arg in enumerate(argv)]


@pytest.mark.parametrize("name,tls", FILES.items())
def test_compose_file_is_valid_and_current(name, tls):
    config = compose_config(name)
    assert (REPO / name).read_text() == render_compose(3, tls=tls), f"{name} is stale: regenerate it"
    commands = service_commands(compose_topology(3, tls=tls))
    for service, argv in commands.items():
        assert config["services"][service]["command"] == argv, service


@pytest.mark.parametrize("tls", [False, True])
def test_compose_and_loopback_run_the_same_commands(tls):
    compose = service_commands(compose_topology(3, tls=tls))
    loopback = service_commands(loopback_topology(3, root="/r", key_path="/r/keys/k", tls_dir="/c" if tls else ""))
    assert list(compose) == list(loopback)
    for service in compose:
        assert shape(compose[service]) == shape(loopback[service]), service
    # the values that differ are only addresses and paths, and node ids match
    assert "--disable-runtime-dependency-installation" in compose["superlink"]
    for i in range(3):
        assert f"bank-id='bank-{i}' partition-id={i}" in compose[f"bank-{i}"][-1]


def test_secret_key_only_reaches_bank_executors():
    services = compose_config("docker-compose.yml")["services"]

    def volumes(service: str) -> set[str]:
        out = set()
        for v in services[service].get("volumes", []):
            out.add(v["source"] if isinstance(v, dict) else v.split(":")[0])
        return out

    keygen = " ".join(services["keygen"]["command"])
    assert keygen.count("context.secret.ckks /out/bank-") == 3
    assert "context.secret.ckks /out/server" not in keygen and "install -m 600" in keygen
    assert "/ceremony" in services["keygen"]["tmpfs"][0]
    assert not any("bank-" in v and "keys" in v for v in volumes("serverapp") | volumes("superlink"))
    for i in range(3):
        mine = volumes(f"bank-{i}-apps")
        assert f"fedmoe_bank-{i}-keys" in mine or f"bank-{i}-keys" in mine
        assert not any(f"bank-{j}-keys" in v for v in mine for j in range(3) if j != i)
        assert "server-keys" not in " ".join(mine)
