"""Crash-safe tensor files for the bank's state dir (the bytes/JSON writers are fedmoe.protocol.files)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedmoe.protocol.files import atomic_path


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """safetensors file written to a temp file, fsynced and renamed (a crash leaves old or new)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
