"""Loopback deployment: a SuperLink, its ServerApp executor and N bank SuperNodes on 127.0.0.1.

    python -m fedmoe.fl_server.launch --banks 3 [--run-config "num-rounds=3 ..."] [--root runs/federation]
        [--data bank-0=PATH ...] [--policy bank-0=PATH ...] [--tls]

Refuses up front what cannot work (fewer banks than min-banks, an unknown or mistyped run-config
key, a missing data file), runs the key ceremony if the job has no keys yet, starts every process
of `fedmoe.fl_server.deploy.service_commands` (the same commands docker-compose.yml and the kits run),
submits the job with `flwr run`, streams its output, and stops everything it started, also on
SIGTERM/SIGINT or error. Exit code: 0 only if Flower reports the run completed and the job's state
says finished; 1 if the job failed (the ServerApp's last error is printed); 2 if it refused to
start; 128+signal when stopped. Logs (`<root>/logs/`) carry no ANSI colour codes.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedmoe.crypto.keys import PUBLIC_FILE, SECRET_FILE, keygen
from fedmoe.fl_server.ceremony import ensure_loopback_keys
from fedmoe.fl_server.deploy import (
    FLOWER_ENV,
    SERVICE_ENV,
    Topology,
    executor_env,
    loopback_topology,
    service_commands,
    simulation_command,
)
from fedmoe.fl_server.submit import run_status

REPO_ROOT = Path(__file__).resolve().parents[2]
CONNECTION = "fedmoe-loopback"
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")  # Flower colours its log lines; log files get none


class LaunchError(RuntimeError):
    """A deployment or job failure the launcher reports on the console (exit code 1 or 2)."""


def _pump(src, sink, echo: Callable[[bytes], None] | None = None) -> None:
    """Copies a child's output line by line into `sink` without ANSI codes (and to `echo`)."""
    for line in iter(src.readline, b""):
        clean = ANSI.sub(b"", line)
        with contextlib.suppress(ValueError):  # the deployment closed the log while stopping
            sink.write(clean)
            sink.flush()
        if echo is not None:
            echo(clean)
    src.close()


PROGRESS = re.compile(rb"(bank-\S+: step \d+/\d+.*)$")


def _echo_progress(line: bytes) -> None:
    """Training progress lines of a bank's ClientApp (its DP step loop logs them) on the console."""
    found = PROGRESS.search(line.rstrip())
    if found:
        sys.stdout.write(f"    {found.group(1).decode(errors='replace')}\n")
        sys.stdout.flush()


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
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**self.env, **SERVICE_ENV.get(name, {}), **self._executor_env(name)},
            start_new_session=True,  # its own process group: stop() takes its children too
        )
        echo = _echo_progress if name.endswith("-apps") else None  # a bank's training progress, on the console
        threading.Thread(target=_pump, args=(process.stdout, log, echo), daemon=True, name=f"log-{name}").start()
        self.processes[name] = process
        return process

    def _executor_env(self, name: str) -> dict[str, str]:
        """A bank's executor checks its node-config at start (policy, data, keys) and stops on a bad one."""
        bank = next((b for b in self.topology.banks if f"{b.bank_id}-apps" == name), None)
        return executor_env(bank) if bank is not None else {}

    def start(self, *, simulation: bool = False) -> None:
        if simulation:
            host, port = self.topology.superlink_host, self.topology.superlink_port
            if port_in_use(host, port):  # else `flwr run` would submit to whatever federation listens there
                raise LaunchError(f"superlink: port {port} on {host} is already in use; pick another --port")
            process = self.start_service("superlink", simulation_command(self.topology))
            wait_for_port(self.topology.superlink_host, self.topology.superlink_port, 60, process)
            return
        for name in service_commands(self.topology):
            self.restart(name)
            if name == "superlink" and self.topology.supernode_auth:
                self.register_banks([b.bank_id for b in self.topology.banks])

    def register_banks(self, bank_ids: list[str]) -> None:
        """Registers these banks' SuperNode public keys with the SuperLink (authenticated mode)."""
        from fedmoe.fl_server.provision import register

        keys = self.root / "auth" / "registered"
        keys.mkdir(parents=True, exist_ok=True)
        for old in keys.glob("*.pub"):
            old.unlink()
        for bank in self.topology.banks:
            if bank.bank_id in bank_ids:
                (keys / f"{bank.bank_id}.pub").write_bytes(Path(bank.auth_key).with_suffix(".pub").read_bytes())
        if register(self.topology.superlink_address, self.topology.ca_path, keys, flwr=str(_venv_bin() / "flwr")):
            raise LaunchError("registering the banks' SuperNode keys failed (see above)")

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
        time.sleep(0.2)  # let the log pumps drain what the processes wrote last
        for log in self.logs:
            log.close()
        self.logs.clear()

    def flwr_run(
        self,
        run_config: dict[str, object],
        *,
        timeout: float | None = None,
        stream: bool = True,
        app: Path = REPO_ROOT,
        echo: bool = True,
    ) -> subprocess.CompletedProcess:
        """Submits the job; with `stream` it also prints the ServerApp's output until the run ends.

        The output (without colour codes) is also in `<root>/logs/flwr-run.log` and in the
        result's `stdout`; `run_id(result)` reads the run id from it. The `flwr` process is one of
        the deployment's processes: `stop()` ends it too.
        """
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        argv = [str(_venv_bin() / "flwr"), "run", str(app), CONNECTION, *(["--stream"] if stream else [])]
        if overrides:
            argv += ["--run-config", overrides]
        if self.simulated_banks:
            argv += ["--federation-config", f"num-supernodes={self.simulated_banks}"]
        lines: list[bytes] = []

        def show(line: bytes) -> None:
            lines.append(line)
            if echo:
                sys.stdout.write(line.decode(errors="replace"))
                sys.stdout.flush()

        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "flwr-run.log", "ab") as log:
            process = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.processes["flwr-run"] = process
            pump = threading.Thread(target=_pump, args=(process.stdout, log, show), daemon=True)
            pump.start()
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
            finally:
                pump.join(timeout=10)
        return subprocess.CompletedProcess(argv, returncode, stdout=b"".join(lines).decode(errors="replace"))

    def run_status(self, run_id: int) -> dict[str, str]:
        """Flower's record of a run: status ("finished:completed", "finished:failed", ...) and details."""
        return run_status(run_id, self.env, connection=CONNECTION, flwr=str(_venv_bin() / "flwr"))

    def last_error(self, service: str, lines: int = 12) -> str:
        """The last error a service logged: from its last ERROR line or traceback to the end."""
        path = self.log_dir / f"{service}.log"
        if not path.exists():
            return ""
        text = path.read_text(errors="replace").splitlines()
        marks = [i for i, line in enumerate(text) if "ERROR" in line or line.startswith("Traceback")]
        tail = text[marks[-1] if marks else -lines :]
        return "\n".join(tail[-3 * lines :])


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def flwr_env(root: Path, superlink_address: str, ca_cert: str = "") -> dict[str, str]:
    """Environment with a private FLWR_HOME whose config.toml names our SuperLink connection."""
    home = root / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{ca_cert}"\n' if ca_cert else "insecure = true\n"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{superlink_address}"\n{tls}',
        encoding="utf-8",
    )
    env = dict(os.environ)
    env.update(FLOWER_ENV)  # every Flower process we start: no telemetry, no update check
    env["FLWR_HOME"] = str(home)
    # The banks' executors run the bundle `flwr run` builds from this working tree: no release to
    # approve on one's own machine. Deployed banks gate every bundle (deploy.py, provision.py).
    env.setdefault("FEDMOE_APPROVED_APPS", "off")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env["PATH"] = os.pathsep.join([str(_venv_bin()), env.get("PATH", "")])
    return env


def ensure_keys(key_dir: Path) -> None:
    if not (key_dir / SECRET_FILE).exists():
        info = keygen(key_dir).info
        print(f"key ceremony: key {info.key_id[:12]} epoch {info.epoch} -> {key_dir}")
    if not (key_dir / PUBLIC_FILE).exists():
        raise LaunchError(
            f"{key_dir / PUBLIC_FILE} is missing (the server needs the public context); rerun the ceremony"
        )


def ensure_tls(root: Path, n_banks: int) -> tuple[str, str]:
    """CA + SuperLink certificate for 127.0.0.1, a SuperNode key pair and executor secret per bank."""
    from fedmoe.crypto.node_keys import make_node_key, make_secret
    from fedmoe.fl_server.provision import issue_server_cert, make_ca

    certs, auth = root / "certs", root / "auth"
    if not (certs / "server.pem").exists():
        ca_key, ca_cert = make_ca(certs)
        issue_server_cert(ca_key, ca_cert, ["127.0.0.1", "localhost"], certs)
    if not (auth / "server" / "exec.secret").exists():
        make_secret(auth / "server" / "exec.secret")
    for i in range(n_banks):
        bank = auth / f"bank-{i}"
        if not (bank / "node.key").exists():
            make_node_key(bank)
            make_secret(bank / "exec.secret")
    return str(certs), str(auth)


@contextlib.contextmanager
def loopback(
    n_banks: int,
    root: Path,
    *,
    base_port: int = 8000,
    simulation: bool = False,
    tls: bool = False,
    data_paths: dict[str, str] | None = None,
    policy_files: dict[str, str] | None = None,
) -> Iterator[Deployment]:
    """Starts the loopback deployment (or a simulation SuperLink) and always stops it on exit.

    With `tls`: TLS, SuperNode authentication (the banks' keys are registered before they start)
    and executor secrets, as in docker-compose.yml and the kits.
    """
    root = root.resolve()
    key_dir = root / "keys"
    ensure_keys(key_dir)
    ensure_loopback_keys(key_dir, n_banks)  # secure aggregation: BFV keys, bank identities, pins
    tls_dir, auth_dir = ensure_tls(root, n_banks) if tls and not simulation else ("", "")
    topo = loopback_topology(
        n_banks,
        root=str(root),
        key_path=str(key_dir / SECRET_FILE),
        base_port=base_port,
        tls_dir=tls_dir,
        auth_dir=auth_dir,
        data_paths=data_paths,
        policy_files=policy_files,
    )
    env = flwr_env(root, topo.superlink_address, topo.ca_path)
    # Every idle SuperNode's poll is a write to the SuperLink's SQLite database, and every executor's
    # poll costs CPU: when many banks share this host, each polls less often.
    env.setdefault("FEDMOE_SUPERNODE_POLL", f"{max(0.5, n_banks / 10):g}")
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = f"{max(0.1, n_banks / 30):g}"
    deployment = Deployment(topo, root, env, simulated_banks=n_banks * simulation)
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
    out: dict[str, object] = {}
    for pair in shlex.split(text, posix=False):  # keeps quotes: values are TOML
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LaunchError(f"run-config: expected key=value, got {pair!r}")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise LaunchError(f"run-config key {key!r}: {value!r} is not a TOML value ({e})") from e
    return out


def job_defaults(app: Path = REPO_ROOT) -> dict[str, object]:
    """The job's keys and defaults: `[tool.flwr.app.config]` of the app's pyproject.toml."""
    with open(app / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def check_run_config(overrides: dict[str, object], defaults: dict[str, object]) -> None:
    """Names the key Flower would reject only as "[code: 15] Invalid run configuration"."""
    for key, value in overrides.items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; job keys: {', '.join(sorted(defaults))}"
            raise LaunchError(f"run-config key {key!r} is not a key of the job ([tool.flwr.app.config]){hint}")
        expected = type(defaults[key])
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        ok = ok or (expected is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise LaunchError(
                f"run-config key {key!r}: expected {expected.__name__} (default {defaults[key]!r}), "
                f"got {type(value).__name__} {value!r}"
            )


def run_id(result: subprocess.CompletedProcess) -> int | None:
    match = re.search(r"Successfully started run (\d+)", result.stdout or "")
    return int(match.group(1)) if match else None


def job_outcome(deployment: Deployment, result: subprocess.CompletedProcess, run_config: dict[str, object]) -> str:
    """ "" when the job finished; otherwise what failed, with the failing component's last error."""
    if result.returncode != 0 or run_id(result) is None:
        return f"submitting the job failed (flwr run exit {result.returncode}): {result.stdout.strip()[-600:]}"
    rid = run_id(result)
    status = deployment.run_status(rid)
    while status.get("status", "").startswith(("running", "starting", "pending")):
        # the log stream ended (a SuperLink busy with many banks can drop it) but the job goes on
        print(f"run {rid} is still {status.get('status')}: waiting for it (its output is in the logs)", flush=True)
        time.sleep(10)
        status = deployment.run_status(rid)
    if status.get("status") != "finished:completed":
        detail = status.get("status-details", "")
        return f"run {rid} ended {status.get('status')} {detail}\nServerApp's last error:\n" + deployment.last_error(
            "serverapp"
        )
    state_file = Path(str(run_config["server-state-dir"])) / str(run_config["job-id"]) / "state.json"
    if not state_file.exists():
        return f"run {rid} completed but the job wrote no state ({state_file})"
    state = json.loads(state_file.read_text())
    if not state.get("finished"):
        return f"job {run_config['job-id']!r} did not finish: {state.get('end_reason') or 'no reason recorded'}"
    rounds = state.get("rounds") or []
    if rounds and not rounds[-1].get("aggregated"):  # never "completed" over a missing or quarantined last aggregate
        return f"job {run_config['job-id']!r} has no valid final model: {state.get('end_reason')}"
    return ""


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT so every started process is stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame) -> None:
    raise _Stop(signum)


def _pairs(items: list[str], what: str, n_banks: int, must_exist: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        bank, sep, path = item.partition("=")
        if not sep or not bank or not path:
            raise LaunchError(f"{what}: expected bank-<i>=PATH, got {item!r}")
        if bank not in {f"bank-{i}" for i in range(n_banks)}:
            raise LaunchError(f"{what}: no bank {bank!r} in this deployment (bank-0 .. bank-{n_banks - 1})")
        resolved = Path(path).expanduser().resolve()
        if must_exist and not resolved.is_file():
            raise LaunchError(f"{what} {bank}: {resolved} is not a file")
        out[bank] = str(resolved)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedmoe.fl_server.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--banks", type=int, default=3)
    p.add_argument("--root", type=Path, default=Path("runs/federation"))
    p.add_argument("--port", type=int, default=8000, help="SuperLink port; SuperNodes use port+100+i")
    p.add_argument("--run-config", default="", help='overrides, e.g. "num-rounds=2 local-steps=10"')
    p.add_argument("--simulation", action="store_true", help="simulate the banks in the SuperLink (Ray)")
    p.add_argument("--tls", action="store_true", help="TLS + SuperNode authentication + executor secrets")
    p.add_argument("--data", action="append", default=[], metavar="BANK=PATH", help="a bank's data file (repeat)")
    p.add_argument(
        "--policy", action="append", default=[], metavar="BANK=PATH", help="a bank's privacy policy (repeat)"
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        defaults = job_defaults()
        overrides = parse_run_config(args.run_config)
        check_run_config(overrides, defaults)
        run_config = {**job_paths(args.root), **overrides}
        if "synthetic-banks" not in overrides and args.banks > int(defaults.get("synthetic-banks", 0)):  # type: ignore[arg-type]
            run_config["synthetic-banks"] = args.banks  # every bank gets its own slice (partition-id 0..N-1)
        min_banks = int(run_config.get("min-banks", defaults.get("min-banks", 1)))  # type: ignore[arg-type]
        if args.banks < 1 or args.banks < min_banks:
            raise LaunchError(
                f"--banks {args.banks}: the job needs at least min-banks={min_banks} banks per round; "
                "start more banks or lower min-banks"
            )
        data = _pairs(args.data, "--data", args.banks, must_exist=True)
        policy = _pairs(args.policy, "--policy", args.banks, must_exist=True)
        if args.simulation and (data or policy or args.tls):
            raise LaunchError("--data, --policy and --tls need SuperNodes; drop --simulation")
        full = {**defaults, **run_config}
        what = "simulated banks" if args.simulation else "SuperNodes"
        print(f"starting loopback federation: 1 SuperLink + {args.banks} {what} on 127.0.0.1 (logs: {args.root}/logs)")
        print(f"public context for the server: {args.root / 'keys' / PUBLIC_FILE}")
        with loopback(
            args.banks,
            args.root,
            base_port=args.port,
            simulation=args.simulation,
            tls=args.tls,
            data_paths=data,
            policy_files=policy,
        ) as deployment:
            result = deployment.flwr_run(run_config)
            failure = job_outcome(deployment, result, full)
    except _Stop as stop:
        print(f"stopped by signal {stop.signum}; all federation processes stopped", file=sys.stderr)
        return 128 + stop.signum
    except (LaunchError, RuntimeError, TimeoutError) as err:
        print(f"error: {err} (logs: {args.root}/logs)", file=sys.stderr)
        return 2
    print("all federation processes stopped")
    if failure:
        print(f"error: {failure}\n(logs: {args.root}/logs)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
