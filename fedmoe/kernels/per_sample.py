"""Per-sample gradients of an expert bank, for DP-SGD: norms, instantiated grads, clipped sum.

A bank y_n = x_n W[e_n]^T (fedmoe/kernels/expert_gemm.py) has per-sample weight gradient
    dW_b[e] = sum_{n: sample_n = b, expert_n = e} g_n x_n^T        (g_n = dL/dy_n)
Ops, with segment (b, e) = the rows of sample b routed to expert e:
    expert_grad_norm2           norm2_b = sum_e ||dW_b[e]||_F^2
                                 ghost form per segment: sum_{n,m} <x_n, x_m> <g_n, g_m>
    expert_grad_sample          dW_b[e] instantiated, [B, E, O, I] (the DP "hooks mode" reference)
    expert_weight_grad_clipped  dW[e] = sum_n c_{sample_n} g_n x_n^T   (book-keeping: clip factors
                                 folded into the one weight-gradient GEMM, no second backward)
Rows are grouped by (expert, sample) with align_by_expert, so each segment is one contiguous run;
per-segment results are summed per sample through a dense [E, B] table, so the order of the sum
does not depend on scheduling (deterministic on every backend).

Backends (fedmoe/kernels/backend.py): reference (per-segment matmuls, any dtype; float64 for DP tests),
grouped_mm (norms: ghost segments by bucketed Grams, the others instantiated by grouped GEMMs,
chosen per segment by cost; grads: one grouped GEMM over the segments), triton (ghost or
instantiating kernel chosen per segment by cost; fedmoe/kernels/per_sample_triton.py,
fedmoe/kernels/expert_gemm_triton.py).
Beside the dispatcher, `expert_grad_norm2_bucketed` takes the ghost form on any device with
batched Grams of zero-padded segments: the CPU paths above instantiate every segment's O x I
gradient, and where the DP plan asks for the ghost form this is ~2.5x faster on CPU
(fedmoe/fl_client/dp/samplers/expert.py calls it there).

Legend: N rows, B samples, E experts, I input width, O output width, S non-empty segments,
L longest segment of a bucket.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch

from fedmoe.kernels.backend import Backend, choose_backend, grouped_mm_reason, triton_reason
from fedmoe.kernels.errors import KernelError
from fedmoe.kernels.expert_gemm import grouped_outer
from fedmoe.kernels.permute import ExpertAlignment, align_by_expert, check_ids

NormMethod = Literal["auto", "ghost", "instantiate"]
_GROUPED_MM_CHUNK = 1 << 24  # elements of instantiated [segments, O, I] grads per grouped_mm call


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _per_sample_sum(seg_values_S: torch.Tensor, align: ExpertAlignment) -> torch.Tensor:
    """Sum segment values per sample via a dense [E, B] table (no atomics, fixed order)."""
    table_EB = seg_values_S.new_zeros(align.n_experts * align.n_samples)
    table_EB[align.segment_expert_S * align.n_samples + align.segment_sample_S] = seg_values_S
    return table_EB.view(align.n_experts, align.n_samples).sum(dim=0)


# ---------------------------------------------------------------------------------------------
# References (the spec)
# ---------------------------------------------------------------------------------------------


def _segments(align: ExpertAlignment) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (expert, sample, rows) for every non-empty segment, rows as original indices."""
    offsets = align.segment_offsets_S1.tolist()
    experts, samples = align.segment_expert_S.tolist(), align.segment_sample_S.tolist()
    for s, (e, b) in enumerate(zip(experts, samples, strict=True)):
        yield e, b, align.order_N[offsets[s] : offsets[s + 1]]


def expert_grad_norm2_reference(
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    expert_ids_N: torch.Tensor,
    sample_ids_N: torch.Tensor,
    n_samples: int,
    n_experts: int,
) -> torch.Tensor:
    """norm2_b = sum_e ||G_be^T X_be||_F^2 by one matmul per segment; fp32 (fp64 for fp64 input)."""
    acc = _acc_dtype(x_NI.dtype)
    align = align_by_expert(expert_ids_N, n_experts, sample_ids_N, n_samples, backend="reference")
    norm2_B = torch.zeros(n_samples, dtype=acc, device=x_NI.device)
    for _, b, rows in _segments(align):
        norm2_B[b] += (grad_NO[rows].to(acc).t() @ x_NI[rows].to(acc)).square().sum()
    return norm2_B


def expert_grad_sample_reference(
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    expert_ids_N: torch.Tensor,
    sample_ids_N: torch.Tensor,
    n_samples: int,
    n_experts: int,
) -> torch.Tensor:
    """dW_b[e] = G_be^T X_be, [B, E, O, I] in x's dtype; zero where sample b skips expert e."""
    align = align_by_expert(expert_ids_N, n_experts, sample_ids_N, n_samples, backend="reference")
    out = x_NI.new_zeros(n_samples, n_experts, grad_NO.shape[1], x_NI.shape[1])
    for e, b, rows in _segments(align):
        out[b, e] = grad_NO[rows].t() @ x_NI[rows]
    return out


def expert_weight_grad_clipped_reference(
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    expert_ids_N: torch.Tensor,
    sample_ids_N: torch.Tensor,
    clip_factor_B: torch.Tensor,
    n_experts: int,
) -> torch.Tensor:
    """dW[e] = sum_n c_{sample_n} g_n x_n^T, [E, O, I] in x's dtype."""
    scaled_NO = (grad_NO.to(_acc_dtype(grad_NO.dtype)) * clip_factor_B.to(grad_NO.device)[sample_ids_N, None]).to(
        grad_NO.dtype
    )
    align = align_by_expert(expert_ids_N, n_experts, backend="reference")
    out = x_NI.new_zeros(n_experts, grad_NO.shape[1], x_NI.shape[1])
    for e, _, rows in _segments(align):
        out[e] = scaled_NO[rows].t() @ x_NI[rows]
    return out


# ---------------------------------------------------------------------------------------------
# Ghost norm by bucketed segment Grams (any device; the DP samplers' CPU path)
# ---------------------------------------------------------------------------------------------


def _bucket_bounds(lengths: list[int], min_fill: float) -> list[tuple[int, int]]:
    """Ranges [lo, hi) of the non-zero `lengths` (sorted descending) in which every length is at
    least `min_fill` x the range's first: padding a bucket to its longest then wastes at most
    1 - min_fill^2 of its Gram work, however skewed the routing."""
    bounds, lo = [], 0
    n_live = sum(1 for n in lengths if n > 0)
    for hi in range(1, n_live + 1):
        if hi == n_live or lengths[hi] < min_fill * lengths[lo]:
            bounds.append((lo, hi))
            lo = hi
    return bounds


# Padded segment lengths are rounded up to this: MKL's batched Grams run ~1.3-1.6x faster per
# row at a multiple of 8 (L 29 -> 32, 47 -> 48 on one CPU thread) than the padding costs.
_PAD_MULTIPLE = 8


def _segment_buckets(
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    key_N: torch.Tensor,
    n_segments: int,
    min_fill: float = 0.9,
    multiple: int = _PAD_MULTIPLE,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Rows grouped into segments by key, zero-padded per bucket of similar-length segments.

    Padding every segment to the longest one costs (longest / mean)^2 in Gram work once routing is
    skewed; ranking segments by length and padding each bucket of similar lengths (`_bucket_bounds`)
    to its own longest (rounded up to `multiple`) keeps the waste small (a fixed 4 buckets cost
    ~1.6x on the small preset's banks: one outlier segment pads its whole quarter).
    Yields (segment ids [k], x [k, L, I], g [k, L, O]) for non-empty segments. Here S counts every
    segment, empty or not.
    """
    device = key_N.device
    counts_S = torch.bincount(key_N, minlength=n_segments)
    by_len_S = torch.argsort(counts_S, descending=True, stable=True)  # segment ids, longest first
    rank_S = torch.empty_like(by_len_S)
    rank_S[by_len_S] = torch.arange(n_segments, device=device)
    order_N = torch.argsort(rank_S[key_N], stable=True)  # rows by segment rank: segments are row ranges
    len_sorted_S = counts_S[by_len_S]
    start_S = torch.cumsum(len_sorted_S, 0) - len_sorted_S
    lengths = len_sorted_S.tolist()
    bounds = _bucket_bounds(lengths, min_fill)
    if not bounds:
        return
    n_live = bounds[-1][1]
    # Every padded slot of every bucket in one flat layout: segment j of a bucket padded to L owns
    # L slots; slot p reads sorted row start_j + p, or row 0 (zeroed after) past the segment's end.
    # One index_select per operand: advanced indexing and index_put are several times slower on CPU.
    padded = [-(-lengths[lo] // multiple) * multiple for lo, _ in bounds]
    width = [w for (lo, hi), w in zip(bounds, padded, strict=True) for _ in range(hi - lo)]  # per segment
    width_S = torch.tensor(width, device=device)
    seg_of_slot = torch.repeat_interleave(torch.arange(n_live, device=device), width_S)
    slot0_S = torch.cumsum(width_S, 0) - width_S
    pos = torch.arange(seg_of_slot.shape[0], device=device) - slot0_S[seg_of_slot]
    pad = pos >= len_sorted_S[seg_of_slot]
    src = order_N.index_select(0, (start_S[seg_of_slot] + pos).masked_fill_(pad, 0))
    x_pad, g_pad = x_NI.index_select(0, src), grad_NO.index_select(0, src)
    pad_slots = pad.nonzero().squeeze(1)
    x_pad.index_fill_(0, pad_slots, 0)
    g_pad.index_fill_(0, pad_slots, 0)
    slot0 = 0
    for (lo, hi), length in zip(bounds, padded, strict=True):
        k = hi - lo
        rows = slice(slot0, slot0 + k * length)
        slot0 += k * length
        yield by_len_S[lo:hi], x_pad[rows].view(k, length, -1), g_pad[rows].view(k, length, -1)


def _ghost_segments(
    x_NI: torch.Tensor, grad_NO: torch.Tensor, key_N: torch.Tensor, n_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment ids [k], ||G_s^T X_s||_F^2 [k]) of the non-empty segments of rows keyed by segment."""
    ids, values = [], []
    for segs, x_pad, g_pad in _segment_buckets(x_NI, grad_NO, key_N, n_segments):
        gram_x = torch.bmm(x_pad, x_pad.transpose(1, 2))  # (k, L, L) <x_s, x_s'>
        gram_g = torch.bmm(g_pad, g_pad.transpose(1, 2))  # (k, L, L) <g_s, g_s'>
        ids.append(segs)
        values.append((gram_x * gram_g).sum(dim=(1, 2)))
    if not ids:
        return key_N.new_zeros(0), x_NI.new_zeros(0)
    return torch.cat(ids), torch.cat(values)


def expert_grad_norm2_bucketed(
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    expert_ids_N: torch.Tensor,
    sample_ids_N: torch.Tensor,
    n_samples: int,
    n_experts: int,
) -> torch.Tensor:
    """Squared per-sample gradient norms [B] by the ghost form (segment Grams), any dtype/device."""
    key_N = sample_ids_N * n_experts + expert_ids_N
    segs, values = _ghost_segments(x_NI, grad_NO, key_N, n_samples * n_experts)
    return grad_NO.new_zeros(n_samples).index_add_(0, segs // n_experts, values).clamp(min=0)


# ---------------------------------------------------------------------------------------------
# grouped_mm path: all segments' G^T X in grouped GEMMs
# ---------------------------------------------------------------------------------------------


def _ghost_is_cheaper(counts_S: torch.Tensor, width_in: int, width_out: int, method: NormMethod) -> torch.Tensor:
    """Per segment: ghost (~n^2 (I + O) / 2 multiply-adds) or instantiate (~n O I), as `method` says."""
    if method == "auto":
        return counts_S * (width_in + width_out) <= 2 * width_in * width_out
    return torch.full_like(counts_S, method == "ghost", dtype=torch.bool)


def _instantiated_norm2(x_sorted: torch.Tensor, g_sorted: torch.Tensor, ends_R: torch.Tensor) -> torch.Tensor:
    """||G_r^T X_r||_F^2 [R] of consecutive runs of sorted rows, in grouped GEMMs of bounded size."""
    acc = _acc_dtype(x_sorted.dtype)
    ends = ends_R.tolist()
    per_chunk = max(1, _GROUPED_MM_CHUNK // (x_sorted.shape[1] * g_sorted.shape[1]))
    parts = []
    for r0 in range(0, len(ends), per_chunk):
        r1 = min(r0 + per_chunk, len(ends))
        row0 = ends[r0 - 1] if r0 else 0
        outer = grouped_outer(g_sorted[row0 : ends[r1 - 1]], x_sorted[row0 : ends[r1 - 1]], ends_R[r0:r1] - row0)
        parts.append(outer.to(acc).square().sum(dim=(1, 2)))
    return torch.cat(parts) if parts else x_sorted.new_zeros(0, dtype=acc)


def _norm2_grouped_mm(
    x_NI: torch.Tensor, grad_NO: torch.Tensor, align: ExpertAlignment, method: NormMethod
) -> torch.Tensor:
    """Per segment the cheaper form: ghost by bucketed Grams, or instantiated by grouped GEMMs."""
    acc = _acc_dtype(x_NI.dtype)
    if x_NI.device.type == "cpu":  # fp32 grouped_mm exists on CPU: instantiate in fp32
        x_NI, grad_NO = x_NI.to(acc), grad_NO.to(acc)
    counts_S = align.segment_offsets_S1.diff()
    ghost_S = _ghost_is_cheaper(counts_S, x_NI.shape[1], grad_NO.shape[1], method)
    seg_sorted_N = torch.repeat_interleave(torch.arange(align.n_segments, device=x_NI.device), counts_S)
    seg_norm2_S = torch.zeros(align.n_segments, dtype=acc, device=x_NI.device)
    if bool(ghost_S.all()):  # the Grams group rows themselves: no gather here
        seg_N = torch.empty_like(seg_sorted_N).index_copy_(0, align.order_N, seg_sorted_N)
        ids, values = _ghost_segments(x_NI, grad_NO, seg_N, align.n_segments)
        seg_norm2_S[ids] = values.to(acc)
    elif bool(ghost_S.any()):
        rows = align.order_N[ghost_S[seg_sorted_N]]
        ids, values = _ghost_segments(
            x_NI.index_select(0, rows),
            grad_NO.index_select(0, rows),
            seg_sorted_N[ghost_S[seg_sorted_N]],
            align.n_segments,
        )
        seg_norm2_S[ids] = values.to(acc)
    inst_S = ~ghost_S
    if bool(inst_S.any()):  # the kept segments' sorted rows stay contiguous runs
        rows = align.order_N[inst_S[seg_sorted_N]]
        ends = torch.cumsum(counts_S[inst_S], 0)
        seg_norm2_S[inst_S] = _instantiated_norm2(x_NI.index_select(0, rows), grad_NO.index_select(0, rows), ends)
    # The ghost sum is a square norm in exact arithmetic; rounding may leave a -0-ish residue.
    return _per_sample_sum(seg_norm2_S.clamp(min=0), align)


# ---------------------------------------------------------------------------------------------
# Triton path
# ---------------------------------------------------------------------------------------------


def _norm2_triton(
    x_NI: torch.Tensor, grad_NO: torch.Tensor, align: ExpertAlignment, method: NormMethod
) -> torch.Tensor:
    from fedmoe.kernels.expert_gemm_triton import segment_outer_norm2
    from fedmoe.kernels.per_sample_triton import ghost_norm2_triton

    width_in, width_out = x_NI.shape[1], grad_NO.shape[1]
    ghost_S = _ghost_is_cheaper(align.segment_offsets_S1.diff(), width_in, width_out, method)
    ghost_ids = ghost_S.nonzero().squeeze(1)
    inst_ids = (~ghost_S).nonzero().squeeze(1)
    seg_norm2_S = torch.zeros(align.n_segments, dtype=torch.float32, device=x_NI.device)
    seg_norm2_S[ghost_ids] = ghost_norm2_triton(x_NI, grad_NO, align.order_N, align.segment_offsets_S1, ghost_ids)
    seg_norm2_S[inst_ids] = segment_outer_norm2(
        grad_NO, x_NI, align.order_N, align.segment_offsets_S1, inst_ids, gather_g=True, gather_x=True
    )
    # The ghost sum is a square norm in exact arithmetic; rounding may leave a -0-ish residue.
    return _per_sample_sum(seg_norm2_S.clamp(min=0), align)


# ---------------------------------------------------------------------------------------------
# Validation and dispatch
# ---------------------------------------------------------------------------------------------


def _validate(
    op: str, x_NI: torch.Tensor, grad_NO: torch.Tensor, expert_ids_N: torch.Tensor, sample_ids_N: torch.Tensor
) -> None:
    if x_NI.dim() != 2 or grad_NO.dim() != 2 or grad_NO.shape[0] != x_NI.shape[0]:
        raise KernelError(
            f"{op}: expected x [N, I] and grad [N, O] with the same N, "
            f"got {tuple(x_NI.shape)} and {tuple(grad_NO.shape)}"
        )
    if x_NI.dtype != grad_NO.dtype or x_NI.device != grad_NO.device:
        raise KernelError(f"{op}: x is {x_NI.dtype} on {x_NI.device}, grad is {grad_NO.dtype} on {grad_NO.device}")
    n_rows = x_NI.shape[0]
    for name, ids in (("expert_ids", expert_ids_N), ("sample_ids", sample_ids_N)):
        if ids.shape != (n_rows,) or ids.dtype not in (torch.int32, torch.int64):
            raise KernelError(f"{op}: {name} must be int [N={n_rows}], got {ids.dtype} {tuple(ids.shape)}")


def _choose(
    op: str,
    backend: str,
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    expert_ids_N: torch.Tensor,
    sample_ids_N: torch.Tensor,
) -> str:
    return choose_backend(
        op,
        backend,
        {
            "triton": triton_reason(x_NI, grad_NO, expert_ids_N, sample_ids_N),
            "grouped_mm": grouped_mm_reason(x_NI, grad_NO, widths=(x_NI.shape[1], grad_NO.shape[1])),
        },
    )


def _sample_alignment(
    op: str,
    alignment: ExpertAlignment | None,
    expert_ids_N: torch.Tensor,
    sample_ids_N: torch.Tensor,
    n_samples: int,
    n_experts: int,
    chosen: str,
) -> ExpertAlignment:
    if alignment is None:
        align_backend = "triton" if chosen == "triton" else "reference"
        return align_by_expert(expert_ids_N, n_experts, sample_ids_N, n_samples, backend=align_backend)
    alignment.check(op, expert_ids_N.shape[0], n_experts, n_samples)
    return alignment


def expert_grad_norm2(
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    expert_ids_N: torch.Tensor,
    sample_ids_N: torch.Tensor,
    n_samples: int,
    n_experts: int,
    *,
    alignment: ExpertAlignment | None = None,
    method: NormMethod = "auto",
    backend: Backend = "auto",
) -> torch.Tensor:
    """Per-sample squared Frobenius norm of an expert bank's weight gradient.

    Args:
        x_NI: the bank's input rows, [N, I].
        grad_NO: dL/dy for the bank's output rows, [N, O] (same row order as x).
        expert_ids_N: expert of each row, int [N] in [0, n_experts).
        sample_ids_N: sample owning each row, int [N] in [0, n_samples).
        n_samples: B.
        n_experts: E.
        alignment: `align_by_expert(expert_ids_N, E, sample_ids_N, B)` if already built.
        method: grouped_mm and triton: "ghost", "instantiate", or "auto" (the cheaper one per
            segment; on grouped_mm the ghost segments go through bucketed Grams).
        backend: "auto", "reference", "grouped_mm" or "triton" (see fedmoe.kernels.backend).

    Returns:
        norm2_B = sum_e ||sum_{n in (b, e)} g_n x_n^T||_F^2, fp32 (fp64 for fp64 inputs).

    Raises:
        KernelError: on mismatched shapes/dtypes, ids out of range, an alignment built for other
            rows, an unknown method, or an explicit backend that cannot run here.
    """
    op = "expert_grad_norm2"
    _validate(op, x_NI, grad_NO, expert_ids_N, sample_ids_N)
    if method not in ("auto", "ghost", "instantiate"):
        raise KernelError(f"{op}: method expected 'auto', 'ghost' or 'instantiate', got {method!r}")
    chosen = _choose(op, backend, x_NI, grad_NO, expert_ids_N, sample_ids_N)
    if chosen == "reference":
        return expert_grad_norm2_reference(x_NI, grad_NO, expert_ids_N, sample_ids_N, n_samples, n_experts)
    align = _sample_alignment(op, alignment, expert_ids_N, sample_ids_N, n_samples, n_experts, chosen)
    if chosen == "grouped_mm":
        return _norm2_grouped_mm(x_NI, grad_NO, align, method)
    return _norm2_triton(x_NI, grad_NO, align, method)


def _grad_sample_grouped_mm(
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    expert_ids_N: torch.Tensor,
    sample_ids_N: torch.Tensor,
    n_samples: int,
    n_experts: int,
) -> torch.Tensor:
    """[B, E, O, I] as one grouped GEMM over rows sorted by slot (sample, expert), not by
    (expert, sample) as `align_by_expert` does: the runs come out in the output's order, an empty
    slot is an empty run, and nothing is scattered (~1.5 ms less per call on FFA-LoRA's experts)."""
    n_rows = x_NI.shape[0]
    check_ids("expert_ids", expert_ids_N, n_rows, n_experts)
    check_ids("sample_ids", sample_ids_N, n_rows, n_samples)
    slot_N = sample_ids_N.long() * n_experts + expert_ids_N.long()
    order_N = torch.argsort(slot_N, stable=True)
    counts_K = torch.bincount(slot_N, minlength=n_samples * n_experts)
    outer = grouped_outer(grad_NO.index_select(0, order_N), x_NI.index_select(0, order_N), counts_K.cumsum(0))
    if not outer.is_cpu:  # CPU grouped_mm writes zeros for an empty run; elsewhere we do not rely on it
        outer = outer.masked_fill((counts_K == 0)[:, None, None], 0)
    return outer.reshape(n_samples, n_experts, grad_NO.shape[1], x_NI.shape[1]).contiguous()


def expert_grad_sample(
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    expert_ids_N: torch.Tensor,
    sample_ids_N: torch.Tensor,
    n_samples: int,
    n_experts: int,
    *,
    alignment: ExpertAlignment | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Instantiated per-sample weight gradients of an expert bank.

    Args:
        x_NI, grad_NO, expert_ids_N, sample_ids_N, n_samples, n_experts, alignment, backend:
            as in `expert_grad_norm2` (grouped_mm sorts the rows by (sample, expert) itself and
            does not use `alignment`).

    Returns:
        grad_sample [B, E, O, I] in x's dtype; grad_sample[b, e] = sum_{n in (b, e)} g_n x_n^T,
        zero where sample b sent no row to expert e.

    Raises:
        KernelError: as `expert_grad_norm2`.
    """
    op = "expert_grad_sample"
    _validate(op, x_NI, grad_NO, expert_ids_N, sample_ids_N)
    chosen = _choose(op, backend, x_NI, grad_NO, expert_ids_N, sample_ids_N)
    if chosen == "reference":
        return expert_grad_sample_reference(x_NI, grad_NO, expert_ids_N, sample_ids_N, n_samples, n_experts)
    if chosen == "grouped_mm":
        return _grad_sample_grouped_mm(x_NI, grad_NO, expert_ids_N, sample_ids_N, n_samples, n_experts)
    align = _sample_alignment(op, alignment, expert_ids_N, sample_ids_N, n_samples, n_experts, chosen)
    width_out, width_in = grad_NO.shape[1], x_NI.shape[1]
    slot_S = align.segment_sample_S * n_experts + align.segment_expert_S
    from fedmoe.kernels.expert_gemm_triton import segment_outer

    out = segment_outer(
        grad_NO,
        x_NI,
        align.order_N,
        align.segment_offsets_S1,
        slot_S,
        n_slots=n_samples * n_experts,
        gather_g=True,
        gather_x=True,
        zero_fill=True,
    )
    return out.view(n_samples, n_experts, width_out, width_in)


def expert_weight_grad_clipped(
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    expert_ids_N: torch.Tensor,
    sample_ids_N: torch.Tensor,
    clip_factor_B: torch.Tensor,
    n_experts: int,
    *,
    alignment: ExpertAlignment | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Sum of clipped per-sample gradients of an expert bank, in one weight-gradient pass.

    Args:
        x_NI, grad_NO, expert_ids_N, sample_ids_N: as in `expert_grad_norm2`.
        clip_factor_B: per-sample factor c_b = min(1, C / ||grad_b||) (any float dtype), [B].
        n_experts: E.
        alignment: any `align_by_expert` of these rows (with or without sample ids).
        backend: "auto", "reference", "grouped_mm" or "triton" (see fedmoe.kernels.backend).

    Returns:
        dW [E, O, I] in x's dtype: dW[e] = sum_{n: expert_n = e} c_{sample_n} g_n x_n^T.

    Raises:
        KernelError: as `expert_grad_norm2`, or a clip_factor that is not a float vector.
    """
    op = "expert_weight_grad_clipped"
    _validate(op, x_NI, grad_NO, expert_ids_N, sample_ids_N)
    if clip_factor_B.dim() != 1 or not clip_factor_B.is_floating_point():
        raise KernelError(
            f"{op}: clip_factor must be a float vector [B], got {clip_factor_B.dtype} {tuple(clip_factor_B.shape)}"
        )
    n_samples = clip_factor_B.shape[0]
    chosen = _choose(op, backend, x_NI, grad_NO, expert_ids_N, sample_ids_N)
    if chosen == "reference":
        return expert_weight_grad_clipped_reference(x_NI, grad_NO, expert_ids_N, sample_ids_N, clip_factor_B, n_experts)
    if alignment is None:
        align_backend = "triton" if chosen == "triton" else "reference"
        alignment = align_by_expert(expert_ids_N, n_experts, sample_ids_N, n_samples, backend=align_backend)
    alignment.check(op, x_NI.shape[0], n_experts)
    scale_N = clip_factor_B.to(device=x_NI.device, dtype=torch.float32)[sample_ids_N].contiguous()
    if chosen == "grouped_mm":
        # Gather first, then scale the gathered copy (one pass less than scaling, then gathering).
        order_N = alignment.order_N
        g_sorted_NO = grad_NO.index_select(0, order_N)
        scale_sorted_N1 = scale_N.index_select(0, order_N)[:, None]
        if g_sorted_NO.dtype == torch.float32:
            g_sorted_NO.mul_(scale_sorted_N1)
        else:  # scaled in fp32, rounded once (as the reference)
            g_sorted_NO = (g_sorted_NO.float() * scale_sorted_N1).to(grad_NO.dtype)
        return grouped_outer(g_sorted_NO, x_NI.index_select(0, order_N), alignment.expert_offsets_E1[1:])
    from fedmoe.kernels.expert_gemm_triton import segment_outer

    experts_E = torch.arange(n_experts, device=x_NI.device)
    return segment_outer(
        grad_NO,
        x_NI,
        alignment.order_N,
        alignment.expert_offsets_E1,
        experts_E,
        n_slots=n_experts,
        gather_g=True,
        gather_x=True,
        row_scale_N=scale_N,
    )
