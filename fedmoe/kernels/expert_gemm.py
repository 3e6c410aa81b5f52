"""Expert-bank linear layers: each row is multiplied by the weight of the expert it was routed to.

Math: y_n = x_n @ W[e_n]^T   for n = 0..N-1, with W stacked [E, O, I] (nn.Linear/HF layout).
The model's experts call it twice (gate|up bank, then down bank) and apply SwiGLU in PyTorch between.
Gradients: dx_n = dy_n W[e_n];  dW[e] = sum_{n: e_n = e} dy_n^T x_n.
Dropless, no capacity, no padded copies: rows are grouped by expert through a permutation
(fedmoe/kernels/permute.py), multiplied per expert run, and scattered back to their original order.

Backends (fedmoe/kernels/backend.py):
    reference   stable sort, one matmul per expert segment, unsort (the spec; any dtype)
    grouped_mm  the same through torch's grouped GEMM (autograd by torch)
    triton      ScatterMoE-style kernels reading rows through the permutation
                (fedmoe/kernels/expert_gemm_triton.py), backward by kernels as well.

Legend: N rows (token x top-k slots), E experts, I input width, O output width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedmoe.kernels.backend import Backend, choose_backend, grouped_mm_reason, triton_reason
from fedmoe.kernels.errors import KernelError
from fedmoe.kernels.permute import ExpertAlignment, align_by_expert

# ---------------------------------------------------------------------------------------------
# Reference (the spec)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# grouped_mm path (torch's grouped GEMM; autograd by torch)
# ---------------------------------------------------------------------------------------------


def _grad_wanted(ctx, i: int) -> bool:
    """Whether this backward must produce the gradient of input i.

    ctx.needs_input_grad only says the input requires grad; under torch.autograd.grad(outputs,
    inputs) (book-keeping DP asks for the layers' output gradients only) the weight's
    AccumulateGrad never runs, and computing dW for it would cost one GEMM per expert for nothing.
    Torch's own nodes skip it; a custom Function has to ask the engine.
    """
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    try:
        return node is None or torch._C._will_engine_execute_node(node)
    except RuntimeError:  # a leaf under autograd.grad: the engine cannot tell, so compute it
        return True


class _GroupedMmLinear(torch.autograd.Function):
    """y = unsort(grouped_mm(sort(x), W^T)) with a hand-written backward (grouped_mm path).

    Why not torch's autograd through x[order], grouped_mm and an unsort: on CPU the row
    permutations by advanced indexing / index_copy (and their scatter backwards) cost 1.5-5x a
    gather (index_select), and grouped_mm's own backward returns dW as [E, I, O], so the
    AccumulateGrad of the [E, O, I] weight copies it once more. Here every permutation is a gather
    (by `order` one way, by its inverse the other), dW = grouped_mm(dy_sorted^T, x_sorted) lands in
    the weight's layout, and a gradient nobody asked for (the frozen base of a LoRA bank, the
    weights under book-keeping DP) is not computed.
    """

    @staticmethod
    def forward(ctx, x_NI, weight_EOI, order_N, inverse_N, offs_E):
        x_sorted_NI = x_NI.index_select(0, order_N)
        ctx.save_for_backward(x_sorted_NI, weight_EOI, order_N, inverse_N, offs_E)
        y_sorted_NO = F.grouped_mm(x_sorted_NI, weight_EOI.transpose(-2, -1), offs=offs_E)
        return y_sorted_NO.index_select(0, inverse_N)

    @staticmethod
    def backward(ctx, grad_y_NO):
        x_sorted_NI, weight_EOI, order_N, inverse_N, offs_E = ctx.saved_tensors
        grad_y_sorted_NO = grad_y_NO.index_select(0, order_N)  # contiguous, as grouped_mm needs
        grad_x = grad_w = None
        if _grad_wanted(ctx, 0):
            grad_x = F.grouped_mm(grad_y_sorted_NO, weight_EOI, offs=offs_E).index_select(0, inverse_N)
        if _grad_wanted(ctx, 1):
            grad_w = grouped_outer(grad_y_sorted_NO, x_sorted_NI, offs_E)
        return grad_x, grad_w, None, None, None


def narrow_input_first(width_in: int, width_out: int, device: torch.device) -> bool:
    """True where G^T X [O, I] is faster as (X^T G)^T on this device: a rank-wide input (LoRA B).

    CPU GEMMs (torch 2.13, one thread) writing an output only ~8 columns wide run ~2-4x slower
    than the same product written the other way round: 256 segments of 32 rows, I 8, O 256:
    grouped_mm 3.1 ms vs 2.2 ms with the transpose (bmm over 16 samples, T 128: 0.61 vs 0.16
    ms); for I 64 or wider the direct form wins (docs/performance.md, session 10).
    """
    return device.type == "cpu" and width_in <= 16 and width_out >= 4 * width_in


def grouped_outer(g_sorted_NO: torch.Tensor, x_sorted_NI: torch.Tensor, run_ends_R: torch.Tensor) -> torch.Tensor:
    """[R, O, I] = G_r^T X_r for consecutive runs of sorted rows ending at run_ends (exclusive).

    A view of an [R, I, O] result where `narrow_input_first` says so (callers copy or reduce it).
    """
    n_rows, width_out, width_in = g_sorted_NO.shape[0], g_sorted_NO.shape[1], x_sorted_NI.shape[1]
    if n_rows == 0:  # grouped_mm rejects empty operands
        return g_sorted_NO.new_zeros(run_ends_R.shape[0], width_out, width_in)
    offs = run_ends_R.to(torch.int32)
    # The transposed operand as a column-major view: grouped_mm takes it as is, whatever N is.
    if narrow_input_first(width_in, width_out, g_sorted_NO.device):
        return F.grouped_mm(x_sorted_NI.contiguous().t(), g_sorted_NO.contiguous(), offs=offs).transpose(1, 2)
    return F.grouped_mm(g_sorted_NO.contiguous().t(), x_sorted_NI.contiguous(), offs=offs)


def _grouped_mm_linear(x_NI: torch.Tensor, weight_EOI: torch.Tensor, align: ExpertAlignment) -> torch.Tensor:
    if x_NI.shape[0] == 0:  # grouped_mm rejects empty operands
        return x_NI.new_zeros(0, weight_EOI.shape[1])
    offs_E = align.expert_offsets_E1[1:].to(torch.int32)
    order_N = align.order_N
    inverse_N = torch.empty_like(order_N).index_copy_(0, order_N, torch.arange(order_N.shape[0], device=order_N.device))
    # The weight enters through a view: a non-leaf node, whose execution the engine can report
    # to _grad_wanted even under autograd.grad (it cannot for a leaf such as a Parameter).
    return _GroupedMmLinear.apply(x_NI, weight_EOI.view_as(weight_EOI), order_N, inverse_N, offs_E)


# ---------------------------------------------------------------------------------------------
# Triton path: autograd Functions whose forward and backward run the kernels
# ---------------------------------------------------------------------------------------------


class _ExpertLinearTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI, weight_EOI, order_N, expert_offsets_E1):
        from fedmoe.kernels.expert_gemm_triton import grouped_matmul

        ctx.save_for_backward(x_NI, weight_EOI, order_N, expert_offsets_E1)
        return grouped_matmul(
            x_NI, weight_EOI, order_N, expert_offsets_E1, trans_w=False, gather_a=True, scatter_c=True
        )

    @staticmethod
    def backward(ctx, grad_y_NO):
        from fedmoe.kernels.expert_gemm_triton import grouped_matmul, segment_outer

        x_NI, weight_EOI, order_N, offsets_E1 = ctx.saved_tensors
        grad_y_NO = grad_y_NO.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_matmul(
                grad_y_NO, weight_EOI, order_N, offsets_E1, trans_w=True, gather_a=True, scatter_c=True
            )
        if ctx.needs_input_grad[1]:
            experts_E = torch.arange(weight_EOI.shape[0], device=x_NI.device)
            grad_w = segment_outer(
                grad_y_NO,
                x_NI,
                order_N,
                offsets_E1,
                experts_E,
                n_slots=weight_EOI.shape[0],
                gather_g=True,
                gather_x=True,
            )
        return grad_x, grad_w, None, None


# ---------------------------------------------------------------------------------------------
# Validation and dispatch
# ---------------------------------------------------------------------------------------------


def validate_expert_linear(
    x_NI: torch.Tensor, expert_ids_N: torch.Tensor, weight_EOI: torch.Tensor, op: str = "expert_linear"
) -> None:
    if x_NI.dim() != 2:
        raise KernelError(f"{op}: x must be 2-D [N, I], got shape {tuple(x_NI.shape)}")
    if weight_EOI.dim() != 3:
        raise KernelError(f"{op}: weight must be 3-D [E, O, I], got shape {tuple(weight_EOI.shape)}")
    if x_NI.shape[1] != weight_EOI.shape[2]:
        raise KernelError(
            f"{op}: x has width {x_NI.shape[1]}, weight expects I={weight_EOI.shape[2]} "
            f"(weight shape {tuple(weight_EOI.shape)})"
        )
    if expert_ids_N.shape != (x_NI.shape[0],) or expert_ids_N.dtype not in (torch.int32, torch.int64):
        raise KernelError(
            f"{op}: expert_ids must be int [N={x_NI.shape[0]}], got {expert_ids_N.dtype} "
            f"shape {tuple(expert_ids_N.shape)}"
        )
    if x_NI.dtype != weight_EOI.dtype:
        raise KernelError(f"{op}: x dtype {x_NI.dtype} != weight dtype {weight_EOI.dtype}")


def _choose(op: str, backend: str, tensors: list[torch.Tensor], widths: tuple[int, ...]) -> str:
    return choose_backend(
        op, backend, {"triton": triton_reason(*tensors), "grouped_mm": grouped_mm_reason(*tensors[:-1], widths=widths)}
    )


def _alignment(
    op: str, alignment: ExpertAlignment | None, expert_ids_N: torch.Tensor, n_experts: int, backend: str
) -> ExpertAlignment:
    if alignment is None:
        return align_by_expert(expert_ids_N, n_experts, backend="triton" if backend == "triton" else "reference")
    alignment.check(op, expert_ids_N.shape[0], n_experts)
    return alignment


def expert_linear(
    x_NI: torch.Tensor,
    expert_ids_N: torch.Tensor,
    weight_EOI: torch.Tensor,
    *,
    alignment: ExpertAlignment | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Dispatcher: y[n] = x[n] @ weight[expert_ids[n]].T, differentiable in x and weight.

    Args:
        x_NI: rows to transform, [N, I].
        expert_ids_N: expert of each row, int64 [N], values in [0, E).
        weight_EOI: stacked expert weights, [E, O, I].
        alignment: rows already grouped by `align_by_expert(expert_ids_N, E, ...)`, to share one
            permutation between several GEMMs; built here when None (reference ignores it).
        backend: "auto", "reference", "grouped_mm" or "triton" (see fedmoe.kernels.backend).

    Returns:
        y_NO in the original row order.

    Raises:
        KernelError: on a shape, dtype or width mismatch, an alignment built for other rows, or
            an explicit backend that cannot run here.
    """
    validate_expert_linear(x_NI, expert_ids_N, weight_EOI)
    n_experts, width_out, width_in = weight_EOI.shape
    chosen = _choose("expert_linear", backend, [x_NI, weight_EOI, expert_ids_N], (width_in, width_out))
    if chosen == "reference":
        return expert_linear_reference(x_NI, expert_ids_N, weight_EOI)
    align = _alignment("expert_linear", alignment, expert_ids_N, n_experts, chosen)
    if chosen == "grouped_mm":
        return _grouped_mm_linear(x_NI, weight_EOI, align)
    return _ExpertLinearTriton.apply(x_NI, weight_EOI, align.order_N, align.expert_offsets_E1)
