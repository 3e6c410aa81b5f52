"""`fedmoe <command> ...`: one entry point for what users type; each command is a module's `main`.

    fedmoe launch ...      the loopback federation or simulation (python -m fedmoe.fl_server.launch)
    fedmoe provision ...   per-site kits and the release banks pin (python -m fedmoe.fl_server.provision)
    fedmoe submit ...      submit a job to the SuperLink, exit non-zero unless it completes
    fedmoe compose ...     the one-host docker-compose file (python -m fedmoe.fl_server.deploy)
    fedmoe keys ...        key ceremonies and identities (python -m fedmoe.crypto)
    fedmoe site ...        a bank's own site: keys born there, checks, status (python -m fedmoe.fl_client.site)
    fedmoe export ...      a bank writes the job's global model (python -m fedmoe.fl_client.export)
    fedmoe local ...       one bank, no federation (python -m fedmoe.fl_client.local)
    fedmoe model ...       export / generate / evaluate a checkpoint (python -m fedmoe.model)
    fedmoe generate ...    = fedmoe model generate ...
    fedmoe audit ...       the privacy officer's audit (python -m fedmoe.audit)

Each is also a console script of its own (`fedmoe-launch`, `fedmoe-audit`, ...: pyproject.toml).
Modules are imported only for the command that runs, so `fedmoe audit` never loads torch's
training stack and `fedmoe --help` is instant.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # a module with `main(argv: list[str] | None) -> int`
    summary: str
    prefix: tuple[str, ...] = ()  # argv the command always starts with (a subcommand of the module)


COMMANDS: dict[str, Command] = {
    "launch": Command("fedmoe.fl_server.launch", "run a federation on 127.0.0.1 (loopback or simulation)"),
    "provision": Command("fedmoe.fl_server.provision", "write per-site kits and the release banks pin"),
    "submit": Command("fedmoe.fl_server.submit", "submit the released app; exit non-zero unless the job completes"),
    "compose": Command("fedmoe.fl_server.deploy", "write the one-host docker-compose file", ("compose",)),
    "keys": Command("fedmoe.crypto.__main__", "key ceremonies, identities, pins"),
    "site": Command("fedmoe.fl_client.site", "a bank's own site: keys, pins, checks, status, officer bundle"),
    "export": Command("fedmoe.fl_client.export", "a bank writes the job's global model"),
    "local": Command("fedmoe.fl_client.local", "fine-tune one bank locally (no federation, no DP)"),
    "model": Command("fedmoe.model.__main__", "export / generate / evaluate a checkpoint"),
    "generate": Command("fedmoe.model.__main__", "generate text from an exported model", ("generate",)),
    "audit": Command("fedmoe.audit.__main__", "the privacy officer's audit of the banks' ledgers"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    return "usage: fedmoe <command> [args...]   (fedmoe <command> --help)\n\ncommands:\n" + "\n".join(lines)


def run(name: str, argv: list[str]) -> int:
    """Run command `name` with `argv` (everything after the command's name)."""
    command = COMMANDS[name]
    entry: Callable[[list[str]], int | None] = importlib.import_module(command.module).main
    return entry([*command.prefix, *argv]) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fedmoe: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run(name, rest)


def _script(name: str) -> Callable[[], int]:
    def entry() -> int:
        return run(name, sys.argv[1:])

    entry.__name__ = f"{name}_main"
    return entry


# Console scripts `fedmoe-<command>` (pyproject.toml [project.scripts]).
launch = _script("launch")
provision = _script("provision")
keys = _script("keys")
site = _script("site")
export = _script("export")
model = _script("model")
generate = _script("generate")
audit = _script("audit")
