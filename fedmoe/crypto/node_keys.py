"""Deployment keys a site makes for itself: its SuperNode authentication key pair and executor secret.

Made where they are used: a bank's on the bank's host (`fedmoe site init`), the server's executor
secret in the operator's kit. Only `node.pub` ever leaves a bank (the operator registers it with the
SuperLink). Used by fedmoe.fl_client.site and fedmoe.fl_server.provision, which may not import each
other.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

NODE_KEY = "node.key"  # SuperNode authentication private key (OpenSSH EC P-384, what flwr 1.42 reads)
NODE_PUB = "node.pub"
EXEC_SECRET = "exec.secret"  # shared secret between a Runtime API (SuperLink or SuperNode) and its executor


def write_file(path: Path, data: bytes, mode: int) -> Path:
    """Writes `data` with `mode` from the first byte on (a secret is never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def make_node_key(out: Path) -> Path:
    """A SuperNode authentication key pair in `out` (node.key 0600, node.pub 0644); returns node.pub."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_file(out / NODE_KEY, private, 0o600)
    return write_file(out / NODE_PUB, public + b"\n", 0o644)


def make_secret(path: Path) -> Path:
    """A shared secret between a Runtime API (SuperLink or SuperNode) and its executor (0600)."""
    return write_file(path, secrets.token_hex(32).encode(), 0o600)
