#!/usr/bin/env python3
"""The bank's app gate: run only app bundles (FABs) the bank approved.

`fedmoe-superexec` (fedmoe/fl_client/executor.py), the bank's executor, calls `check_bundle` on every
task's bundle before Flower installs it: the SHA-256 of the bundle bytes (the `fab-hash` Flower
reports) must be listed in the bank's own approved-apps file. A bundle that is not listed is
refused: nothing of it is unpacked or imported, and the server gets an error reply for that message.

Approved-apps file (path: $FEDMOE_APPROVED_APPS, e.g. /etc/fedmoe/approved-apps in the image):
one 64-hex-digit SHA-256 per line, optionally followed by a comment; `#` starts a comment line. A
missing or empty file approves nothing (fail closed). It is read for every task, so a bank that
withdraws an approval needs no restart. The release flow that produces the hash is in
docs/deployment.md (`python -m fedmoe.fl_server.provision release`).

Why not Flower's own `--trusted-entities`: in flwr 1.42 a SuperNode with trusted entities accepts
only bundles whose signatures came from Flower Hub through the SuperLink; an app submitted with
`flwr run .` carries none and is always refused, and banks have no internet.

Stdlib only: the executor imports it before any app code is loaded.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

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
