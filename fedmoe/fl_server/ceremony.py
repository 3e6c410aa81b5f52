"""The loopback key ceremony: every key a one-host federation needs, in one key folder.

For a demo or a test on one host (fedmoe.fl_server.launch, tests): the CKKS key pair (the shared-key path),
the BFV key pair of secure aggregation, one Ed25519 identity per bank and the consortium's pins
file. Existing files are kept (a resumed job keeps its keys); banks without an identity get one and
the pins file is rewritten from every identity in the folder. On separate hosts each bank generates
its own identity (`python -m fedmoe.crypto identity`), the pins are collected out of band and the BFV
secret key travels bank to bank sealed (fedmoe.crypto.secagg.ceremony, docs/secagg.md); the server gets
only the public contexts and the pins.

Secret files are written 0600. This module runs in the operator's launcher, never in the ServerApp.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedmoe.crypto.identity import ConsortiumPins, generate_identity, load_identity, write_pins
from fedmoe.crypto.keys import SECRET_FILE as CKKS_SECRET_FILE
from fedmoe.crypto.keys import keygen
from fedmoe.crypto.secagg.bfv import SECRET_FILE as BFV_SECRET_FILE
from fedmoe.protocol.config import PINS_FILE, identity_file_name

logger = logging.getLogger(__name__)


def loopback_ceremony(key_dir: Path, bank_ids: list[str]) -> list[str]:
    """Creates whatever of the CKKS keys, BFV keys, bank identities and pins is missing.

    Returns:
        One line per thing created (what the launcher prints).
    """
    from fedmoe.crypto.secagg.bfv_secret import bfv_keygen  # secret-key code: loaded only here

    key_dir = Path(key_dir)
    made = []
    if not (key_dir / CKKS_SECRET_FILE).exists():
        info = keygen(key_dir).info
        made.append(f"CKKS key {info.key_id[:12]} epoch {info.epoch}")
    if not (key_dir / BFV_SECRET_FILE).exists():
        made.append(f"BFV key {bfv_keygen(key_dir).key_id[:12]}")
    for bank in bank_ids:
        path = key_dir / identity_file_name(bank)
        if not path.exists():
            generate_identity(path, bank)
            made.append(f"identity of {bank}")
    identities = [load_identity(p) for p in sorted(key_dir.glob(identity_file_name("*")))]
    write_pins(key_dir / PINS_FILE, ConsortiumPins.from_identities(identities))
    for line in made:
        logger.info("key ceremony: %s -> %s", line, key_dir)
    return made


def ensure_loopback_keys(key_dir: Path, n_banks: int) -> None:
    """The launcher's call: banks bank-0 .. bank-<n-1>, each thing created printed on the console."""
    for line in loopback_ceremony(key_dir, [f"bank-{i}" for i in range(n_banks)]):
        print(f"key ceremony: {line} -> {key_dir}")  # the launcher's console (a CLI), like ensure_keys
