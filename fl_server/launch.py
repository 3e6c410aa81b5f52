"""Loopback deployment: a SuperLink, its ServerApp executor and N bank SuperNodes on 127.0.0.1.

    python -m fl_server.launch --banks 3 [--run-config "num-rounds=3 ..."] [--root runs/federation]

Runs the key ceremony if the job has no keys yet, starts every process of
`fl_server.deploy.service_commands` (the same commands docker-compose.yml runs), submits the job
with `flwr run`, streams its output, and stops everything it started, also on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from crypto.keys import PUBLIC_FILE, SECRET_FILE, keygen
from fl_server.deploy import Topology, loopback_topology, service_commands, simulation_command

REPO_ROOT = Path(__file__).resolve().parent.parent
CONNECTION = "fedmoe-loopback"


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode} before listening on {port}")
        if port_in_use(host, port):
            return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


@dataclass
class Deployment:
    """Owns the processes it starts; `stop()` ends them all (process groups, TERM then KILL)."""

    topology: Topology
    root: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    simulated_banks: int = 0  # > 0: the SuperLink simulates this many banks (no SuperNodes)
    logs: list = field(default_factory=list)  # open log files of the services

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def start_service(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        exe = _venv_bin() / argv[0]
        process = subprocess.Popen(
            [str(exe) if exe.exists() else argv[0], *argv[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=self.env,
            start_new_session=True,  # its own process group: stop() takes its children too
        )
        self.processes[name] = process
        return process

    def start(self, *, simulation: bool = False) -> None:
        if simulation:
            process = self.start_service("superlink", simulation_command(self.topology))
            wait_for_port(self.topology.superlink_host, self.topology.superlink_port, 60, process)
            return
        for name in service_commands(self.topology):
            self.restart(name)

    def restart(self, name: str) -> subprocess.Popen:
        """(Re)starts one service with its deployment command and waits until it listens."""
        topo = self.topology
        bank_ids = [b.bank_id for b in topo.banks]
        address = None
        if name == "superlink":
            address = (topo.superlink_host, topo.superlink_port)
        elif name in bank_ids:
            i = bank_ids.index(name)
            address = (topo.supernode_hosts[i], topo.supernode_ports[i])
        if address is not None and port_in_use(*address):
            raise RuntimeError(f"{name}: port {address[1]} on {address[0]} is already in use; pick another --port")
        process = self.start_service(name, service_commands(topo)[name])
        if address is not None:
            wait_for_port(*address, 60, process)
        return process

    def kill(self, name: str) -> None:
        """Ends one service (tests use it to drop a bank or the ServerApp executor mid-job)."""
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        # Executors may leave app processes in their group: make sure nothing survives.
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for log in self.logs:
            log.close()
        self.logs.clear()

    def flwr_run(
        self, run_config: dict[str, object], *, timeout: float | None = None, stream: bool = True
    ) -> subprocess.CompletedProcess:
        """Submits the job; with `stream` it also prints the ServerApp's output until the run ends."""
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        argv = [str(_venv_bin() / "flwr"), "run", str(REPO_ROOT), CONNECTION, *(["--stream"] if stream else [])]
        if overrides:
            argv += ["--run-config", overrides]
        if self.simulated_banks:
            argv += ["--federation-config", f"num-supernodes={self.simulated_banks}"]
        return subprocess.run(argv, cwd=REPO_ROOT, env=self.env, timeout=timeout, check=False)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def flwr_env(root: Path, superlink_address: str) -> dict[str, str]:
    """Environment with a private FLWR_HOME whose config.toml names our SuperLink connection."""
    home = root / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{superlink_address}"\ninsecure = true\n',
        encoding="utf-8",
    )
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env["PATH"] = os.pathsep.join([str(_venv_bin()), env.get("PATH", "")])
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def ensure_keys(key_dir: Path) -> None:
    if not (key_dir / SECRET_FILE).exists():
        info = keygen(key_dir).info
        print(f"key ceremony: key {info.key_id[:12]} epoch {info.epoch} -> {key_dir}")


@contextlib.contextmanager
def loopback(n_banks: int, root: Path, *, base_port: int = 8000, simulation: bool = False) -> Iterator[Deployment]:
    """Starts the loopback deployment (or a simulation SuperLink) and always stops it on exit."""
    root = root.resolve()
    key_dir = root / "keys"
    ensure_keys(key_dir)
    topo = loopback_topology(n_banks, root=str(root), key_path=str(key_dir / SECRET_FILE), base_port=base_port)
    deployment = Deployment(topo, root, flwr_env(root, topo.superlink_address), simulated_banks=n_banks * simulation)
    try:
        deployment.start(simulation=simulation)
        yield deployment
    finally:
        deployment.stop()


def job_paths(root: Path) -> dict[str, object]:
    """Run-config entries pointing the job at this deployment's folders (absolute paths)."""
    root = root.resolve()
    return {
        "key-dir": str(root / "keys"),
        "server-state-dir": str(root / "server"),
        "bank-state-root": str(root / "banks"),
    }


def parse_run_config(text: str) -> dict[str, object]:
    import tomllib

    out: dict[str, object] = {}
    for pair in shlex.split(text, posix=False):  # keeps quotes: values are TOML
        key, _, value = pair.partition("=")
        out[key] = tomllib.loads(f"v = {value}")["v"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fl_server.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--banks", type=int, default=3)
    p.add_argument("--root", type=Path, default=Path("runs/federation"))
    p.add_argument("--port", type=int, default=8000, help="SuperLink port; SuperNodes use port+100+i")
    p.add_argument("--run-config", default="", help='overrides, e.g. "num-rounds=2 local-steps=10"')
    p.add_argument("--simulation", action="store_true", help="simulate the banks in the SuperLink (Ray)")
    args = p.parse_args(argv)
    run_config = {**job_paths(args.root), **parse_run_config(args.run_config)}
    what = "simulated banks" if args.simulation else "SuperNodes"
    print(f"starting loopback federation: 1 SuperLink + {args.banks} {what} on 127.0.0.1 (logs: {args.root}/logs)")
    print(f"public context for the server: {args.root / 'keys' / PUBLIC_FILE}")
    try:
        with loopback(args.banks, args.root, base_port=args.port, simulation=args.simulation) as deployment:
            result = deployment.flwr_run(run_config)
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err} (logs: {args.root}/logs)", file=sys.stderr)
        return 2
    print("all federation processes stopped")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
