"""Helpers shared by the Triton kernel modules (imports triton: load only from a *_triton.py file)."""

from __future__ import annotations

import torch
import triton

from fedmoe.kernels.backend import triton_interpreting


def autotune_configs(configs: list[triton.Config], interpret_config: triton.Config) -> list[triton.Config]:
    """The GPU configs, or only `interpret_config` under the interpreter (which rejects several)."""
    return [interpret_config] if triton_interpreting() else configs


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision matching torch: fp32 stays IEEE unless torch allows TF32 matmuls."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
