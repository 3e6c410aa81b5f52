#!/usr/bin/env python3
"""The bank's app gate: `flwr-clientapp` that runs only app bundles the bank approved.

Installed first on the PATH of a bank's executor (`flower-superexec` starts `flwr-clientapp` by
name for every task). Before Flower installs the app bundle (FAB) it pulled from the SuperNode,
the gate hashes it (SHA-256 of the bundle bytes, the `fab-hash` Flower reports) and looks the hash
up in the bank's own approved-apps file. A bundle that is not listed is refused: nothing of it is
unpacked or imported, and the server gets an error reply for that message.

Approved-apps file (path: $FEDMOE_APPROVED_APPS, default /etc/fedmoe/approved-apps): one
64-hex-digit SHA-256 per line, optionally followed by a comment; `#` starts a comment line. A
missing or empty file approves nothing (fail closed). The release flow that produces the hash is
in docs/deployment.md (`python -m fl_server.provision release`).

Why not Flower's own `--trusted-entities`: in flwr 1.42 a SuperNode with trusted entities accepts
only bundles whose signatures came from Flower Hub through the SuperLink; an app submitted with
`flwr run .` carries none and is always refused, and banks have no internet.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

DEFAULT_APPROVED = "/etc/fedmoe/approved-apps"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AppNotApproved(Exception):
    """The app bundle's SHA-256 is not in the bank's approved-apps file."""


def read_approved(path: str | Path) -> dict[str, str]:
    """sha256 -> comment of every approved bundle; raises ValueError naming a malformed line."""
    approved: dict[str, str] = {}
    path = Path(path)
    if not path.is_file():
        return approved
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, comment = line.partition(" ")
        digest = digest.lower()
        if not _HEX64.match(digest):
            raise ValueError(f"{path}:{lineno}: expected a 64-hex-digit SHA-256, got {digest!r}")
        approved[digest] = comment.strip()
    return approved


def check_bundle(fab_content: bytes, approved_file: str | Path) -> str:
    """Returns the bundle's SHA-256 if the bank approved it; raises AppNotApproved otherwise."""
    digest = hashlib.sha256(fab_content).hexdigest()
    approved = read_approved(approved_file)
    if digest not in approved:
        raise AppNotApproved(
            f"app bundle sha256 {digest} is not approved by this bank ({approved_file} lists "
            f"{len(approved)} bundle(s)); refused before installing or importing any of it"
        )
    return digest


def install_gate(approved_file: str | Path) -> None:
    """Wraps Flower's FAB installation in the ClientApp process with `check_bundle`.

    Fails closed: if this flwr version has no such step to wrap, the process exits instead of
    running unchecked code.
    """
    from flwr.supernode.runtime import run_clientapp as runtime

    original = getattr(runtime, "install_from_fab", None)
    if original is None or not hasattr(runtime, "run_clientapp"):
        sys.exit("fedmoe app gate: this flwr version has no install_from_fab step to check; refusing to run")

    def checked_install(fab_file, *args, **kwargs):
        content = fab_file if isinstance(fab_file, bytes | bytearray) else Path(fab_file).read_bytes()
        digest = check_bundle(bytes(content), approved_file)
        print(f"fedmoe app gate: bundle {digest[:16]} approved", file=sys.stderr, flush=True)
        return original(fab_file, *args, **kwargs)

    runtime.install_from_fab = checked_install


def main() -> None:
    install_gate(os.environ.get("FEDMOE_APPROVED_APPS", DEFAULT_APPROVED))
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


if __name__ == "__main__":
    main()
