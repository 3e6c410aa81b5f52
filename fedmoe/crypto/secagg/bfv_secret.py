"""BFV secret side (banks only): key ceremony on one host, the secret loader, decryption.

The server never imports this module (a test checks it). For banks on separate hosts, the secret
file produced here travels bank to bank through `fedmoe.crypto.secagg.ceremony`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts

from fedmoe.crypto.envelope import key_folder
from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.secagg.bfv import (
    INFO_FILE,
    PUBLIC_FILE,
    SECRET_FILE,
    BfvKey,
    bfv_key_id,
    check_secret_file_mode,
    key_envelope,
    load_bfv_chunks,
    load_key_bytes,
    parse_bfv_bundle,
    public_payload,
)
from fedmoe.crypto.secagg.params import SecAggParams
from fedmoe.protocol.files import atomic_write_bytes

log = logging.getLogger(__name__)


def new_bfv_context(params: SecAggParams) -> ts.Context:
    try:
        return ts.context(
            ts.SCHEME_TYPE.BFV,
            poly_modulus_degree=params.poly_modulus_degree,
            plain_modulus=params.plain_modulus,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
    except ValueError as e:
        raise CryptoError(f"BFV keygen: TenSEAL refused {params.to_dict()}: {e}") from e


def secret_key_bytes(ctx: ts.Context, params: SecAggParams) -> bytes:
    """The secret key file's bytes (what the separate-host ceremony encrypts to each bank)."""
    payload = ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    return key_envelope("secret", bfv_key_id(ctx), params, payload)


def public_key_bytes(ctx: ts.Context, params: SecAggParams) -> bytes:
    payload = public_payload(ctx)
    if ts.context_from(payload).is_private():
        raise CryptoError("BFV keygen: internal check failed: the public payload is private")
    return key_envelope("public", bfv_key_id(ctx), params, payload)


@dataclass(frozen=True)
class BfvKeyFiles:
    """What `bfv_keygen` wrote."""

    key_id: str
    secret_path: Path
    public_path: Path
    info_path: Path


def bfv_keygen(out_dir: str | Path, params: SecAggParams | None = None, *, overwrite: bool = False) -> BfvKeyFiles:
    """Single-host ceremony (loopback demo): write the secret, public and info files into one folder.

    Args:
        out_dir: folder (created 0700).
        params: defaults to `SecAggParams()`.
        overwrite: replace existing files instead of refusing.

    Raises:
        CryptoError: files present and not `overwrite`, or TenSEAL refused the parameters.
    """
    params = params or SecAggParams()
    out, paths = key_folder(out_dir, (SECRET_FILE, PUBLIC_FILE, INFO_FILE), what="bfv_keygen", overwrite=overwrite)
    ctx = new_bfv_context(params)
    kid = bfv_key_id(ctx)
    atomic_write_bytes(paths[0], secret_key_bytes(ctx, params), mode=0o600)
    atomic_write_bytes(paths[1], public_key_bytes(ctx, params), mode=0o644)
    info = {"format": 1, "key_id": kid, "params": params.to_dict(), "plain_modulus": params.plain_modulus}
    atomic_write_bytes(paths[2], (json.dumps(info, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)
    log.info("BFV keygen: key %s written to %s", kid, out)
    return BfvKeyFiles(key_id=kid, secret_path=paths[0], public_path=paths[1], info_path=paths[2])


def load_bfv_secret(path: str | Path) -> BfvKey:
    """Load a bank's secret BFV context.

    Raises:
        CryptoError: missing file, group/world-accessible mode, malformed file or a public file.
    """
    path = Path(path)
    if not path.is_file():
        raise CryptoError(f"secret BFV context file {path}: not found")
    check_secret_file_mode(path)
    key = load_key_bytes(path.read_bytes(), "secret", what=str(path))
    return BfvKey(context=key.context, key_id=key.key_id, params=key.params, path=path)


def decrypt_residues(bundle: bytes, key: BfvKey) -> tuple[object, np.ndarray]:
    """Decrypt a BFV bundle to residues modulo t (uint64). Any bundle, sum or single input.

    Raises:
        CryptoError: a public key, or any bundle problem (reason says which).
    """
    if not key.is_private():
        raise CryptoError("decrypt: the BFV context is public; decryption needs a bank's secret context")
    header, chunks = parse_bfv_bundle(bundle)
    vecs = load_bfv_chunks(key, header, chunks)
    t = key.params.plain_modulus
    out = np.empty(header.n_values, dtype=np.uint64)
    for i, vec in enumerate(vecs):
        vals = np.asarray(vec.decrypt(), dtype=np.int64)  # centered in (-t/2, t/2]
        out[i * header.slots : i * header.slots + vals.size] = (vals % np.int64(t)).astype(np.uint64)
    return header, out
