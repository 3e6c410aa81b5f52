"""The bank's packed data, cached in its state dir: the synthetic generator, the tokenizer and the
packer run once per (data, tokenizer, packing) instead of in every training message.

Key: SHA-256 of what the packed samples depend on: the data (the file's bytes, or the synthetic
generator's parameters), the tokenizer (its class, ids and tokenizer.json bytes), the packing and
split settings (sequence length, privacy unit, eval fraction, seed) and the source of the code that
generates, splits and packs (a changed generator never reuses an old cache). Entry:
`<state-dir>/data-cache/<key>.pt`, mode 0600 (the bank's records, tokenized: as private as the data),
read with `torch.load(weights_only=True)` (tensors, strings and ints only). A warm executor also
keeps the last entries in memory. A cache file that does not load is rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from fedmoe.fl_client.data.packing import PackedData
from fedmoe.protocol.files import atomic_write_with

logger = logging.getLogger(__name__)

_MEMORY: dict[str, object] = {}  # key -> the loaded value (a warm executor's messages share it)
_MEMORY_ENTRIES = 4


def cache_key(parts: dict, *, data_file: Path | None = None, tokenizer_file: Path | None = None) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for path in (data_file, tokenizer_file):
        digest.update(b"\0" + (_file_digest(path) if path is not None and path.exists() else b"-"))
    digest.update(b"\0" + _code_digest())
    return digest.hexdigest()


def _file_digest(path: Path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


@functools.cache
def _code_digest() -> bytes:
    """The code the samples come from (this package's modules): read once per process, not per message."""
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(b"\0" + module.read_bytes())
    return digest.digest()


def cached(cache_dir: Path, key: str, build: Callable[[], dict]) -> dict:
    """`build()` (a dict of PackedData and strings) once per key; later calls load it."""
    if key in _MEMORY:
        return _MEMORY[key]
    path = cache_dir / f"{key}.pt"
    value = _load(path)
    if value is None:
        value = build()
        atomic_write_with(path, lambda tmp: torch.save(_plain(value), tmp), mode=0o600)
        logger.info("packed data cached in %s", path.name)
    while len(_MEMORY) >= _MEMORY_ENTRIES:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[key] = value
    return value


def _load(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        raw = torch.load(path, weights_only=True)
        return {k: PackedData(**v) if isinstance(v, dict) else v for k, v in raw.items()}
    except Exception as err:  # noqa: BLE001 - a damaged entry is rebuilt, never trusted
        logger.warning("data cache %s unreadable (%s): rebuilding it", path.name, type(err).__name__)
        return None


def _plain(value: dict) -> dict:
    return {
        k: {f: getattr(v, f) for f in PackedData.__dataclass_fields__} if isinstance(v, PackedData) else v
        for k, v in value.items()
    }
