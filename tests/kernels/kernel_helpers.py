"""Shared helpers for the kernel tests: devices, tolerances, routed rows, brute-force grads."""

from __future__ import annotations

import pytest
import torch

from fedmoe.kernels.backend import triton_importable, triton_interpreting
from fedmoe.kernels.expert_gemm import expert_linear_reference

HAS_CUDA = torch.cuda.is_available()
# Triton runs compiled on CUDA, else under the interpreter on CPU tensors (see conftest.py).
TRITON_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_triton = pytest.mark.skipif(
    not triton_importable() or not (HAS_CUDA or triton_interpreting()),
    reason="needs triton with CUDA or TRITON_INTERPRET=1",
)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
# The interpreter computes bf16 tl.dot wrongly (it upcasts), so 16-bit kernel cases need a GPU.
TRITON_DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=needs_cuda, id="bfloat16")]


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances scaled to the dtype's precision."""
    return {
        torch.float64: {"atol": 1e-10, "rtol": 1e-10},
        torch.float32: {"atol": 1e-4, "rtol": 1e-4},
        torch.float16: {"atol": 1e-2, "rtol": 1e-2},
        torch.bfloat16: {"atol": 5e-2, "rtol": 5e-2},
    }[dtype]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0
) -> None:
    """Compare in fp64 with dtype tolerances; `scale` widens atol for sums of many products."""
    tol = tolerances(dtype or expected.dtype)
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), atol=tol["atol"] * scale, rtol=tol["rtol"]
    )


def routed_rows(
    n_rows: int,
    n_experts: int,
    n_samples: int = 1,
    *,
    empty_expert: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (expert_ids_N, sample_ids_N), int64, with `empty_expert` receiving no row and, when
    B > 1, sample 0 never visiting the last expert (a sample with no tokens for an expert)."""
    gen = torch.Generator().manual_seed(seed)
    expert_ids = torch.randint(0, n_experts, (n_rows,), generator=gen)
    sample_ids = torch.randint(0, n_samples, (n_rows,), generator=gen)
    if empty_expert is not None and n_experts > 1:
        alternative = (empty_expert + 1) % n_experts
        expert_ids[expert_ids == empty_expert] = alternative
    if n_samples > 1 and n_experts > 2:
        last = n_experts - 1
        moved = (sample_ids == 0) & (expert_ids == last)
        expert_ids[moved] = 0 if empty_expert != 0 else 1
    return expert_ids.to(device), sample_ids.to(device)


def randn(
    *shape: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    grad: bool = False,
):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def grads(output: torch.Tensor, inputs: list[torch.Tensor], grad_output: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(output, inputs, grad_output))


def brute_force_grad_sample(x_NI, grad_NO, expert_ids_N, sample_ids_N, n_samples: int, n_experts: int) -> torch.Tensor:
    """[B, E, O, I] per-sample weight grads by running backward once per sample (microbatch loop)."""
    weight = torch.zeros(n_experts, grad_NO.shape[1], x_NI.shape[1], dtype=x_NI.dtype, requires_grad=True)
    out = []
    for b in range(n_samples):
        rows = (sample_ids_N == b).nonzero().squeeze(1)
        y = expert_linear_reference(x_NI[rows], expert_ids_N[rows], weight)
        if rows.numel():
            (grad_w,) = torch.autograd.grad(y, weight, grad_NO[rows])
        else:
            grad_w = torch.zeros_like(weight)
        out.append(grad_w)
    return torch.stack(out)
