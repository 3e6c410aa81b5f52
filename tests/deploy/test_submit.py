"""`fedmoe submit` (issue 31): a failed submission or job exits non-zero with the reason, never 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedmoe.fl_server.provision import make_ca
from fedmoe.fl_server.submit import Connection, SubmitError, submit, write_kit_file

REPO = Path(__file__).resolve().parents[2]


def _kit(tmp_path: Path, superlink: str) -> Path:
    kit = tmp_path / "server"
    make_ca(tmp_path / "ca")
    (kit / "secrets").mkdir(parents=True)
    (kit / "secrets" / "ca.crt").write_bytes((tmp_path / "ca" / "ca.crt").read_bytes())
    write_kit_file(kit, superlink)
    return kit


def test_a_folder_that_is_not_a_server_kit_is_named(tmp_path):
    with pytest.raises(SubmitError, match="kit.json: not found"):
        Connection.from_kit(tmp_path)
    kit = _kit(tmp_path, "127.0.0.1:9")
    (kit / "secrets" / "ca.crt").unlink()
    with pytest.raises(SubmitError, match="CA certificate .* is missing"):
        Connection.from_kit(kit)


def test_an_app_folder_without_pyproject_is_refused_before_flwr_runs(tmp_path):
    kit = _kit(tmp_path, "127.0.0.1:9")
    with pytest.raises(SubmitError, match="not an app folder"):
        submit(kit, tmp_path)
    assert not (kit / "flwr-home").exists()


@pytest.mark.slow
def test_an_unreachable_superlink_exits_non_zero_with_flowers_reason(tmp_path):
    kit = _kit(tmp_path, "127.0.0.1:9")  # port 9 (discard): nothing listens
    out = subprocess.run(
        [sys.executable, "-m", "fedmoe", "submit", "--kit", str(kit), "--app", str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert "without starting a run" in out.stderr and "SuperLink" in out.stderr
    config = (kit / "flwr-home" / "config.toml").read_text()
    assert 'address = "127.0.0.1:9"' in config and str((kit / "secrets" / "ca.crt").resolve()) in config


def test_provisioned_server_kits_carry_the_connection(tmp_path):
    from fedmoe.fl_server.provision import BankSpec, provision

    kits = provision(tmp_path / "kits", [BankSpec("bank-0")], superlink_names=["fl.example.org"], ckks=False)
    conn = Connection.from_kit(kits["server"])
    assert conn.superlink == "fl.example.org:8000" and conn.ca_cert.is_file()


def test_the_kit_gives_the_serverapp_its_container_paths_unless_the_job_sets_them(tmp_path):
    """Walked with Docker: the runbook's `--run-config 'num-rounds=3'` failed at the ServerApp with
    "public BFV context file runs/keys/context.public.bfv: not found" (the loopback launcher's default
    path); kit.json now carries the paths its compose mounts and `fedmoe submit` adds them."""
    conn = Connection.from_kit(_kit(tmp_path, "127.0.0.1:9"))
    assert conn.with_defaults("num-rounds=3") == 'key-dir="/keys" server-state-dir="/state/server" num-rounds=3'
    assert (
        conn.with_defaults('key-dir="/k" num-rounds=2') == 'server-state-dir="/state/server" key-dir="/k" num-rounds=2'
    )
    assert conn.with_defaults("") == 'key-dir="/keys" server-state-dir="/state/server"'
