"""Expert GEMMs: Triton and grouped_mm vs the reference, forward and every gradient; dispatch errors."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import TRITON_DEVICE, TRITON_DTYPES, assert_close, needs_cuda, needs_triton, randn, routed_rows

from fedmoe.kernels import (
    KernelError,
    align_by_expert,
    expert_linear,
    expert_linear_reference,
)
from fedmoe.kernels.backend import grouped_mm_reason

# (rows, experts, in width, out width, expert with no rows)
LINEAR_CASES = [
    (37, 5, 20, 12, 2),  # several row tiles, an empty expert, 16-byte aligned widths
    (1, 3, 20, 12, None),  # a single row
    (50, 4, 19, 33, 0),  # non-power-of-two, unaligned widths (grouped_mm does not qualify)
    (0, 3, 8, 4, None),  # no rows at all
    (37, 5, 8, 48, 2),  # a rank-wide input (LoRA B): dW by grouped_outer's transposed form
]


def _magnitude(t: torch.Tensor) -> float:
    return max(1.0, t.detach().abs().max().item()) if t.numel() else 1.0


def _check(fast, reference, inputs: list[torch.Tensor], dtype: torch.dtype, scale: float = 1.0) -> None:
    """fast(*inputs) vs reference on fp64 copies of the same values: output and every gradient.

    atol is the dtype's, times `scale`, times the largest magnitude of the expected tensor.
    """
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    out, ref_out = fast(*inputs), reference(*ref_inputs)
    assert out.dtype == inputs[0].dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, dtype, scale * _magnitude(ref_out))
    wants = [t for t in inputs if t.requires_grad]
    ref_wants = [r for r, t in zip(ref_inputs, inputs, strict=True) if t.requires_grad]
    grad_out = randn(*out.shape, dtype=dtype, device=out.device, seed=99)
    # With no rows an output may not depend on the weights at all: its gradient is zero.
    got = torch.autograd.grad(out, wants, grad_out, allow_unused=True) if out.grad_fn else [None] * len(wants)
    want = (
        torch.autograd.grad(ref_out, ref_wants, grad_out.double(), allow_unused=True)
        if ref_out.grad_fn
        else [None] * len(wants)
    )
    for g, w, t in zip(got, want, wants, strict=True):
        g = torch.zeros_like(t) if g is None else g
        w = torch.zeros_like(t, dtype=torch.float64) if w is None else w
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, w, dtype, scale * _magnitude(w))


def _linear_inputs(case, dtype, device, grad_x=True, grad_w=True):
    n_rows, n_experts, width_in, width_out, empty = case
    expert_ids, _ = routed_rows(n_rows, n_experts, empty_expert=empty, device=device)
    x = randn(n_rows, width_in, dtype=dtype, device=device, seed=1, grad=grad_x)
    weight = randn(n_experts, width_out, width_in, dtype=dtype, device=device, seed=2, grad=grad_w)
    return x, expert_ids, weight


# --- Triton ------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_linear_triton(case, dtype) -> None:
    x, ids, weight = _linear_inputs(case, dtype, TRITON_DEVICE)
    _check(
        lambda x_, w_: expert_linear(x_, ids, w_, backend="triton"),
        lambda x_, w_: expert_linear_reference(x_, ids, w_),
        [x, weight],
        dtype,
    )


@needs_triton
@pytest.mark.parametrize(("grad_x", "grad_w"), [(True, False), (False, True)])
def test_linear_triton_partial_grads(grad_x: bool, grad_w: bool) -> None:
    x, ids, weight = _linear_inputs(LINEAR_CASES[0], torch.float32, TRITON_DEVICE, grad_x, grad_w)
    _check(
        lambda x_, w_: expert_linear(x_, ids, w_, backend="triton"),
        lambda x_, w_: expert_linear_reference(x_, ids, w_),
        [x, weight],
        torch.float32,
    )


@needs_triton
def test_shared_alignment_with_samples() -> None:
    """An alignment sorted by (expert, sample) is also expert-grouped: GEMMs accept it."""
    x, ids, weight = _linear_inputs(LINEAR_CASES[0], torch.float32, TRITON_DEVICE)
    _, sample_ids = routed_rows(x.shape[0], weight.shape[0], 3, empty_expert=2, device=TRITON_DEVICE)
    align = align_by_expert(ids, weight.shape[0], sample_ids, 3, backend="triton")
    y = expert_linear(x, ids, weight, alignment=align, backend="triton")
    assert_close(y, expert_linear_reference(x, ids, weight))


# --- grouped_mm --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_grouped_mm(case, dtype) -> None:
    x, ids, weight = _linear_inputs(case, dtype, "cpu")
    if grouped_mm_reason(x, weight, widths=(case[2], case[3])) is not None:
        with pytest.raises(KernelError, match="grouped_mm"):
            expert_linear(x, ids, weight, backend="grouped_mm")
        return
    _check(
        lambda x_, w_: expert_linear(x_, ids, w_, backend="grouped_mm"),
        lambda x_, w_: expert_linear_reference(x_, ids, w_),
        [x, weight],
        dtype,
    )


def test_grouped_mm_backward_skips_the_weight_gradient_nobody_asks_for(monkeypatch) -> None:
    """autograd.grad w.r.t. x only (book-keeping DP): forward + dx, no dW GEMM; .backward(): all three."""
    x, ids, weight = _linear_inputs(LINEAR_CASES[0], torch.float32, "cpu")
    x.requires_grad_(True)
    weight.requires_grad_(True)
    calls = []
    original = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or original(*a, **k))
    (grad_x,) = torch.autograd.grad(expert_linear(x, ids, weight, backend="grouped_mm").sum(), [x])
    assert len(calls) == 2 and weight.grad is None
    want_x, want_w = torch.autograd.grad(expert_linear_reference(x, ids, weight).sum(), [x, weight])
    assert_close(grad_x, want_x)
    expert_linear(x, ids, weight, backend="grouped_mm").sum().backward()
    assert len(calls) == 5
    assert_close(weight.grad, want_w)


# --- dispatch ----------------------------------------------------------------------------------


def test_float64_runs_reference_on_auto_and_refuses_fast_paths() -> None:
    x, ids, weight = _linear_inputs(LINEAR_CASES[0], torch.float64, "cpu")
    assert_close(expert_linear(x, ids, weight), expert_linear_reference(x, ids, weight))
    with pytest.raises(KernelError, match="float64"):
        expert_linear(x, ids, weight, backend="grouped_mm")
    with pytest.raises(KernelError, match="float64"):
        expert_linear(x, ids, weight, backend="triton")


def test_validation_messages() -> None:
    x, ids, weight = _linear_inputs(LINEAR_CASES[0], torch.float32, "cpu")
    with pytest.raises(KernelError, match="weight expects I=20"):
        expert_linear(x[:, :5], ids, weight)
    with pytest.raises(KernelError, match="expert_ids must be int"):
        expert_linear(x, ids[:3], weight)
    with pytest.raises(KernelError, match="dtype"):
        expert_linear(x, ids, weight.double())
    align = align_by_expert(ids[:10], weight.shape[0])
    with pytest.raises(KernelError, match="alignment built for N=10"):
        expert_linear(x, ids, weight, alignment=align, backend="grouped_mm")


def test_env_forces_reference_through_the_dispatcher(monkeypatch) -> None:
    import fedmoe.kernels.expert_gemm as expert_gemm

    calls = []
    original = expert_gemm.expert_linear_reference
    monkeypatch.setattr(expert_gemm, "expert_linear_reference", lambda *a: calls.append(1) or original(*a))
    x, ids, weight = _linear_inputs(LINEAR_CASES[0], torch.float32, "cpu")
    monkeypatch.setenv("FEDMOE_KERNELS", "reference")
    expert_linear(x, ids, weight)
    assert calls == [1]
    monkeypatch.delenv("FEDMOE_KERNELS")
    expert_linear(x, ids, weight)  # auto on CPU fp32 with aligned widths: grouped_mm
    assert calls == [1]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_triton_compiled_medium(dtype) -> None:
    """Compiled kernels (all autotune configs) on a shape with many tiles per expert."""
    x, ids, weight = _linear_inputs((2000, 8, 256, 96, 3), dtype, "cuda")
    _check(
        lambda x_, w_: expert_linear(x_, ids, w_, backend="triton"),
        lambda x_, w_: expert_linear_reference(x_, ids, w_),
        [x, weight],
        dtype,
    )
