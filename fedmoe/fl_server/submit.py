"""`fedmoe submit`: the operator submits the released app to its SuperLink and learns how the job ended.

    fedmoe submit --kit deploy/kits/server --app deploy/kits/release/app [--run-config 'num-rounds=3 ...']

`flwr run` exits 0 once a run is *started*, whatever becomes of it (a ServerApp that exits 201 still
gave 0). This streams the ServerApp's output like `flwr run --stream`, then asks the SuperLink for the
run's final status and exits non-zero with its reason unless the run finished completed. The
connection (address, CA certificate) comes from the server kit's `kit.json`, written by
`fedmoe provision`; the Flower config.toml it needs is generated into the kit's `flwr-home/`, so no
one writes Flower's config by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedmoe.fl_server.deploy import CONTAINER_RUN_CONFIG, FLOWER_ENV

CONNECTION = "fedmoe"
KIT_FILE = "kit.json"  # {"superlink": "host:port", "ca": "secrets/ca.crt", "run-config": {...}} in the server kit
# A job that does not say otherwise uses the kit's container paths (deploy.CONTAINER_RUN_CONFIG): the
# pyproject defaults, runs/keys and runs/server, are the loopback launcher's; under the kit they failed
# with "public BFV context file runs/keys/...: not found".
RUN_CONFIG_KEY = re.compile(r"(?:^|\s)([A-Za-z0-9_.-]+)\s*=")
RUN_STARTED = re.compile(r"Successfully started run (\d+)")
FINISHED_OK = "finished:completed"


class SubmitError(RuntimeError):
    """The job could not be submitted or did not finish; the message says why."""


@dataclass(frozen=True)
class Connection:
    superlink: str  # host:port
    ca_cert: Path  # the CA the SuperLink's certificate chains to
    run_config: tuple[tuple[str, str], ...] = ()  # the kit's defaults (container paths), key -> TOML value

    @classmethod
    def from_kit(cls, kit: Path) -> Connection:
        path = kit / KIT_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            superlink, ca = str(raw["superlink"]), kit / str(raw["ca"])
        except FileNotFoundError:
            raise SubmitError(f"{path}: not found; --kit must be the server kit `fedmoe provision` wrote") from None
        except (ValueError, KeyError, TypeError) as e:
            raise SubmitError(f"{path}: expected {{'superlink': 'host:port', 'ca': 'path'}}: {e}") from e
        if not ca.is_file():
            raise SubmitError(f"{path}: its CA certificate {ca} is missing")
        defaults = raw.get("run-config", {})
        if not isinstance(defaults, dict):
            raise SubmitError(f"{path}: 'run-config' expected a table of run-config keys, got {defaults!r}")
        return cls(superlink, ca.resolve(), tuple((str(k), json.dumps(v)) for k, v in sorted(defaults.items())))

    def with_defaults(self, run_config: str) -> str:
        """The operator's run config, preceded by the kit's defaults for every key it does not set."""
        given = set(RUN_CONFIG_KEY.findall(run_config))
        extra = [f"{key}={value}" for key, value in self.run_config if key not in given]
        return " ".join([*extra, run_config]).strip()


def write_kit_file(kit: Path, superlink: str, ca: str = "secrets/ca.crt") -> Path:
    """What provisioning leaves in the server kit for `fedmoe submit` (public: an address, a path, defaults)."""
    path = kit / KIT_FILE
    raw = {"superlink": superlink, "ca": ca, "run-config": CONTAINER_RUN_CONFIG}
    path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return path


def flwr_home(kit: Path, conn: Connection) -> dict[str, str]:
    """The environment for `flwr`: FLWR_HOME in the kit with a config.toml naming this SuperLink."""
    home = kit / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{conn.superlink}"\nroot-certificates = "{conn.ca_cert}"\n',
        encoding="utf-8",
    )
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home)}


def _flwr() -> str:
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    if not Path(flwr).exists():
        raise SubmitError("the `flwr` command is not installed next to this Python (pip install fedmoe)")
    return flwr


def start_run(app: Path, run_config: str, env: dict[str, str]) -> int:
    """`flwr run --stream`, its output echoed line by line; the run id Flower assigned."""
    argv = [_flwr(), "run", str(app), CONNECTION, "--stream", *(["--run-config", run_config] if run_config else [])]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = None
    tail: list[str] = []
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail = [*tail[-20:], line.rstrip()]
        match = RUN_STARTED.search(line)
        run = int(match.group(1)) if match and run is None else run
    process.wait()
    if run is None:
        raise SubmitError(f"flwr run exited {process.returncode} without starting a run:\n" + "\n".join(tail))
    return run


def run_status(run: int, env: dict[str, str], *, connection: str = CONNECTION, flwr: str = "") -> dict[str, str]:
    """Flower's record of a run: status ("finished:completed", "finished:failed", ...) and details."""
    out = subprocess.run(
        [flwr or _flwr(), "list", connection, "--run-id", str(run), "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except ValueError:
        return {"status": "unknown", "status-details": (out.stdout + out.stderr).strip()[-400:]}
    return runs[0] if runs else {"status": "unknown", "status-details": f"run {run} not found"}


def wait_for_end(run: int, env: dict[str, str], *, poll: float = 10.0) -> dict[str, str]:
    """The run's final status (the log stream can end before the run does)."""
    status = run_status(run, env)
    while status.get("status", "").startswith(("running", "starting", "pending")):
        print(f"run {run} is still {status['status']}; waiting", flush=True)
        time.sleep(poll)
        status = run_status(run, env)
    return status


def submit(kit: Path, app: Path, run_config: str = "") -> int:
    conn = Connection.from_kit(kit)
    if not (app / "pyproject.toml").is_file():
        raise SubmitError(f"{app}: not an app folder (no pyproject.toml); pass the released app, e.g. <release>/app")
    env = flwr_home(kit, conn)
    run = start_run(app, conn.with_defaults(run_config), env)
    status = wait_for_end(run, env)
    if status.get("status") != FINISHED_OK:
        raise SubmitError(
            f"run {run} ended {status.get('status')}: {status.get('status-details') or 'no details'} "
            "(the ServerApp's reason is in its log and in <server-state-dir>/<job-id>/results.json)"
        )
    print(f"run {run} {FINISHED_OK}")
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedmoe submit", description=__doc__.split("\n\n")[0])
    p.add_argument("--kit", type=Path, required=True, help="the server kit folder (holds kit.json)")
    p.add_argument("--app", type=Path, required=True, help="the released app folder the banks approved")
    p.add_argument("--run-config", default="", help="'key=value ...' overrides of the job config")
    a = p.parse_args(argv)
    try:
        submit(a.kit, a.app, a.run_config)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
