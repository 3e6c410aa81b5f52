"""Expert-bank linear: each row is multiplied by the weight of the expert it was routed to.

Math: y_n = x_n @ W[e_n]^T   for n = 0..N-1, with W stacked [E, O, I] (nn.Linear/HF layout).
Implementation (reference): stable-sort rows by expert id, one matmul per contiguous expert
segment, scatter rows back to their original order. No padding, no capacity: dropless.

Legend: N rows (token x top-k slots), E experts, I input width, O output width.
"""

from __future__ import annotations

import torch

from kernels.errors import KernelError


def sort_by_expert(expert_ids_N: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (order_N, counts_E): rows in expert order (stable, so ties keep row order)."""
    order_N = torch.argsort(expert_ids_N, stable=True)
    counts_E = torch.bincount(expert_ids_N, minlength=n_experts)
    return order_N, counts_E


def expert_linear_reference(x_NI: torch.Tensor, expert_ids_N: torch.Tensor, weight_EOI: torch.Tensor) -> torch.Tensor:
    """Sorted per-expert loop in plain PyTorch: the spec every fast path must match."""
    n_experts = weight_EOI.shape[0]
    order_N, counts_E = sort_by_expert(expert_ids_N, n_experts)
    x_sorted_NI = x_NI[order_N]
    outputs = []
    start = 0
    for e, count in enumerate(counts_E.tolist()):
        if count:
            outputs.append(x_sorted_NI[start : start + count] @ weight_EOI[e].t())
        start += count
    if outputs:
        y_sorted_NO = torch.cat(outputs)
    else:
        y_sorted_NO = x_NI.new_zeros(0, weight_EOI.shape[1])
    y_NO = torch.empty_like(y_sorted_NO)
    y_NO = y_NO.index_copy(0, order_N, y_sorted_NO)
    return y_NO


def validate_expert_linear(x_NI: torch.Tensor, expert_ids_N: torch.Tensor, weight_EOI: torch.Tensor) -> None:
    if x_NI.dim() != 2:
        raise KernelError(f"expert_linear: x must be 2-D [N, I], got shape {tuple(x_NI.shape)}")
    if weight_EOI.dim() != 3:
        raise KernelError(f"expert_linear: weight must be 3-D [E, O, I], got shape {tuple(weight_EOI.shape)}")
    if x_NI.shape[1] != weight_EOI.shape[2]:
        raise KernelError(
            f"expert_linear: x has width {x_NI.shape[1]}, weight expects I={weight_EOI.shape[2]} "
            f"(weight shape {tuple(weight_EOI.shape)})"
        )
    if expert_ids_N.shape != (x_NI.shape[0],) or expert_ids_N.dtype not in (torch.int32, torch.int64):
        raise KernelError(
            f"expert_linear: expert_ids must be int [N={x_NI.shape[0]}], got {expert_ids_N.dtype} "
            f"shape {tuple(expert_ids_N.shape)}"
        )
    if x_NI.dtype != weight_EOI.dtype:
        raise KernelError(f"expert_linear: x dtype {x_NI.dtype} != weight dtype {weight_EOI.dtype}")


def expert_linear(x_NI: torch.Tensor, expert_ids_N: torch.Tensor, weight_EOI: torch.Tensor) -> torch.Tensor:
    """Dispatcher: y[n] = x[n] @ weight[expert_ids[n]].T, differentiable in x and weight.

    Args:
        x_NI: rows to transform, [N, I].
        expert_ids_N: expert of each row, int64 [N], values in [0, E).
        weight_EOI: stacked expert weights, [E, O, I].

    Returns:
        y_NO in the original row order.

    Raises:
        KernelError: on a shape, dtype or width mismatch.
    """
    validate_expert_linear(x_NI, expert_ids_N, weight_EOI)
    return expert_linear_reference(x_NI, expert_ids_N, weight_EOI)
