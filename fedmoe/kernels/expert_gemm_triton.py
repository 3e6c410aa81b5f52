"""Grouped expert GEMMs in Triton, ScatterMoE style: gather, multiply, scatter; nothing padded.

Ops (see fedmoe/kernels/expert_gemm.py for contracts and references). Rows are grouped by expert via
an `ExpertAlignment` (order: sorted position p -> row; expert e owns p in [off_e, off_e+1)):
    grouped matmul     C[r_c(p)] = A[r_a(p)] @ B_e             B_e = W[e]^T (forward) or W[e] (dX)
        r_a(p) = order[p] if GATHER_A else p;  r_c(p) = order[p] if SCATTER_C else p
    segment outer      OUT[slot_s] = sum_{p in run s} scale_r(p) * G[r_g(p)]^T X[r_x(p)]
        runs = experts (dW), or (expert, sample) segments (per-sample grads); NORM2 writes the
        tile's sum of squares instead of the tile (per-sample norms, instantiated form)

Tile schedule of the grouped matmul: expert e has ceil(count_e / BLOCK_M) row tiles; program
pid_m finds its expert by counting cumulative tile ends <= pid_m (all E in registers), so the
host never syncs to size the grid: it launches cdiv(N, BLOCK_M) + E row tiles and the spare ones
exit. Accumulation is fp32; outputs take the output tensor's dtype. No atomics: deterministic.

Legend: N rows, E experts, K contraction width, J output width, O/I weight out/in widths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedmoe.kernels.triton_common import autotune_configs, dot_precision, next_pow2

# The interpreter runs one small config, so tiny test shapes still cover several tiles and
# K-steps; on GPU the autotuner picks among the rest (key: widths + mode, not the row count).
_GMM_INTERPRET = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)
_GMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=5),
]
_OUTER_INTERPRET = triton.Config({"BLOCK_O": 16, "BLOCK_I": 16, "BLOCK_R": 16}, num_warps=1)
_OUTER_CONFIGS = [
    triton.Config({"BLOCK_O": 128, "BLOCK_I": 128, "BLOCK_R": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_O": 64, "BLOCK_I": 128, "BLOCK_R": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_O": 128, "BLOCK_I": 64, "BLOCK_R": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_R": 32}, num_warps=4, num_stages=4),
]


@triton.autotune(
    configs=autotune_configs(_GMM_CONFIGS, _GMM_INTERPRET),
    key=["K", "J", "GATHER_A", "SCATTER_C"],
)
@triton.jit
def _grouped_matmul_kernel(
    # matrices: A rows [*, K]; W per expert read as B_e [K, J] through strides; C rows [*, J]
    a_ptr,
    w_ptr,
    c_ptr,
    # grouping: order [N] (sorted position -> row), expert_offsets [E + 1]
    order_ptr,
    expert_offsets_ptr,
    # widths
    K,
    J,
    # strides
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wj,
    stride_cm,
    stride_cj,
    # meta
    N_EXPERTS: tl.constexpr,
    E_PAD: tl.constexpr,
    GATHER_A: tl.constexpr,
    SCATTER_C: tl.constexpr,
    PRECISION: tl.constexpr,
    # tile sizes
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    # Which expert's run holds row tile pid_m, and where does the tile start?
    experts = tl.arange(0, E_PAD)
    e_ok = experts < N_EXPERTS
    run_start = tl.load(expert_offsets_ptr + experts, mask=e_ok, other=0)
    run_end = tl.load(expert_offsets_ptr + experts + 1, mask=e_ok, other=0)
    n_tiles = (run_end - run_start + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(n_tiles, axis=0)
    e = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
    if e >= N_EXPERTS:
        return
    is_e = experts == e
    first_tile = tl.sum(tl.where(is_e, tile_end - n_tiles, 0), axis=0)
    row_begin = tl.sum(tl.where(is_e, run_start, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
    row_stop = tl.sum(tl.where(is_e, run_end, 0), axis=0)

    pos = row_begin + tl.arange(0, BLOCK_M)
    row_ok = pos < row_stop
    if GATHER_A or SCATTER_C:
        src = tl.load(order_ptr + pos, mask=row_ok, other=0)
    a_rows = (src if GATHER_A else pos).to(tl.int64)
    c_rows = (src if SCATTER_C else pos).to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < J
    ks = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e.to(tl.int64) * stride_we

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + (k0 + ks)[None, :] * stride_ak,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b_offsets = (k0 + ks)[:, None] * stride_wk + cols[None, :] * stride_wj
        b_mask = k_ok[:, None] & col_ok[None, :]
        acc = tl.dot(a, tl.load(w_base + b_offsets, mask=b_mask, other=0.0), acc, input_precision=PRECISION)

    c_offsets = c_rows[:, None] * stride_cm + cols[None, :] * stride_cj
    tl.store(c_ptr + c_offsets, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(
    configs=autotune_configs(_OUTER_CONFIGS, _OUTER_INTERPRET),
    key=["O", "I", "NORM2", "HAS_SCALE", "GATHER_G", "GATHER_X"],
    reset_to_zero=["out_ptr"],  # tuning runs must not leave stale NORM2 partials / slots behind
)
@triton.jit
def _segment_outer_kernel(
    # row matrices: G [*, O] (output grads), X [*, I] (inputs); row scale [N] (by original row)
    g_ptr,
    x_ptr,
    scale_ptr,
    # output: tiles of OUT [slots, O, I], or (NORM2) fp32 partial sums [launched runs, O/I tiles]
    out_ptr,
    # runs: run_offsets [R + 1] over sorted positions, run_ids [launched] -> run, run_slot [R]
    run_offsets_ptr,
    run_ids_ptr,
    run_slot_ptr,
    order_ptr,
    # widths
    O,
    I,
    # strides
    stride_gm,
    stride_go,
    stride_xm,
    stride_xi,
    stride_os,
    stride_oo,
    stride_oi,
    # meta
    GATHER_G: tl.constexpr,
    GATHER_X: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    NORM2: tl.constexpr,
    PRECISION: tl.constexpr,
    # tile sizes
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_i_tiles = tl.cdiv(I, BLOCK_I)
    o = (pid_t // n_i_tiles) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = (pid_t % n_i_tiles) * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok = o < O
    i_ok = i < I

    run = tl.load(run_ids_ptr + pid_s)
    p_begin = tl.load(run_offsets_ptr + run)
    p_end = tl.load(run_offsets_ptr + run + 1)
    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    for p0 in range(p_begin, p_end, BLOCK_R):
        pos = p0 + tl.arange(0, BLOCK_R)
        ok = pos < p_end
        if GATHER_G or GATHER_X or HAS_SCALE:
            src = tl.load(order_ptr + pos, mask=ok, other=0)
        g_rows = (src if GATHER_G else pos).to(tl.int64)
        x_rows = (src if GATHER_X else pos).to(tl.int64)
        g_t = tl.load(  # [BLOCK_O, BLOCK_R]: G rows transposed in the load
            g_ptr + g_rows[None, :] * stride_gm + o[:, None] * stride_go, mask=o_ok[:, None] & ok[None, :], other=0.0
        )
        x = tl.load(
            x_ptr + x_rows[:, None] * stride_xm + i[None, :] * stride_xi, mask=ok[:, None] & i_ok[None, :], other=0.0
        )
        if HAS_SCALE:  # per-sample clip factor folded into G before the product
            scale = tl.load(scale_ptr + src, mask=ok, other=0.0)
            g_t = (g_t.to(tl.float32) * scale[None, :]).to(x.dtype)
        acc = tl.dot(g_t, x, acc, input_precision=PRECISION)

    if NORM2:
        tl.store(out_ptr + pid_s * stride_os + pid_t, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    else:
        slot = tl.load(run_slot_ptr + run).to(tl.int64)
        out_offsets = slot * stride_os + o[:, None] * stride_oo + i[None, :] * stride_oi
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=o_ok[:, None] & i_ok[None, :])


def grouped_matmul(
    a_MK: torch.Tensor,
    weight_EOI: torch.Tensor,
    order_N: torch.Tensor,
    expert_offsets_E1: torch.Tensor,
    *,
    trans_w: bool,
    gather_a: bool,
    scatter_c: bool,
) -> torch.Tensor:
    """C = A @ W[e]^T (trans_w False, K = I) or A @ W[e] (trans_w True, K = O), rows by expert."""
    k, j = (weight_EOI.shape[1], weight_EOI.shape[2]) if trans_w else (weight_EOI.shape[2], weight_EOI.shape[1])
    c = torch.empty(a_MK.shape[0], j, dtype=a_MK.dtype, device=a_MK.device)
    n_rows, n_experts = a_MK.shape[0], weight_EOI.shape[0]
    if n_rows == 0:
        return c
    # B_e[k, j] = W[e, j, k] (trans_w False: y = x W^T) or W[e, k, j] (trans_w True: dx = dy W)
    w = weight_EOI
    stride_wk, stride_wj = (w.stride(1), w.stride(2)) if trans_w else (w.stride(2), w.stride(1))

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) + n_experts, triton.cdiv(j, meta["BLOCK_N"]))

    _grouped_matmul_kernel[grid](
        a_MK,
        w,
        c,
        order_N,
        expert_offsets_E1,
        k,
        j,
        a_MK.stride(0),
        a_MK.stride(1),
        w.stride(0),
        stride_wk,
        stride_wj,
        c.stride(0),
        c.stride(1),
        N_EXPERTS=n_experts,
        E_PAD=next_pow2(n_experts),
        GATHER_A=gather_a,
        SCATTER_C=scatter_c,
        PRECISION=dot_precision(a_MK.dtype),
    )
    return c


def _launch_segment_outer(
    g: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor | None,
    out: torch.Tensor,
    run_offsets: torch.Tensor,
    run_ids: torch.Tensor,
    run_slot: torch.Tensor | None,
    order_N: torch.Tensor,
    *,
    gather_g: bool,
    gather_x: bool,
    norm2: bool,
) -> None:
    O, I = g.shape[1], x.shape[1]
    out_strides = (out.stride(0), out.stride(1), out.stride(2)) if out.dim() == 3 else (out.stride(0), 0, 0)

    def grid(meta: dict) -> tuple[int, int]:
        return (run_ids.shape[0], triton.cdiv(O, meta["BLOCK_O"]) * triton.cdiv(I, meta["BLOCK_I"]))

    _segment_outer_kernel[grid](
        g,
        x,
        scale if scale is not None else g,
        out,
        run_offsets,
        run_ids,
        run_slot if run_slot is not None else run_ids,
        order_N,
        O,
        I,
        g.stride(0),
        g.stride(1),
        x.stride(0),
        x.stride(1),
        *out_strides,
        GATHER_G=gather_g,
        GATHER_X=gather_x,
        HAS_SCALE=scale is not None,
        NORM2=norm2,
        PRECISION=dot_precision(x.dtype),
    )


def segment_outer(
    grad_NO: torch.Tensor,
    x_NI: torch.Tensor,
    order_N: torch.Tensor,
    run_offsets_R1: torch.Tensor,
    run_slot_R: torch.Tensor,
    *,
    n_slots: int,
    gather_g: bool,
    gather_x: bool,
    row_scale_N: torch.Tensor | None = None,
    zero_fill: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """OUT[slot_r] = sum over run r's rows of scale * g x^T, [n_slots, O, I]; every run is launched.

    Slots no run writes are left uninitialised unless zero_fill (runs over all experts cover
    every slot, so dW needs no fill).
    """
    n_runs = run_slot_R.shape[0]
    shape = (n_slots, grad_NO.shape[1], x_NI.shape[1])
    alloc = torch.zeros if zero_fill else torch.empty
    out = alloc(shape, dtype=out_dtype or x_NI.dtype, device=x_NI.device)
    if n_runs:
        run_ids = torch.arange(n_runs, device=x_NI.device)
        _launch_segment_outer(
            grad_NO,
            x_NI,
            row_scale_N,
            out,
            run_offsets_R1,
            run_ids,
            run_slot_R,
            order_N,
            gather_g=gather_g,
            gather_x=gather_x,
            norm2=False,
        )
    return out


def segment_outer_norm2(
    grad_NO: torch.Tensor,
    x_NI: torch.Tensor,
    order_N: torch.Tensor,
    run_offsets_R1: torch.Tensor,
    run_ids_L: torch.Tensor,
    *,
    gather_g: bool,
    gather_x: bool,
) -> torch.Tensor:
    """||sum over run r's rows of g x^T||_F^2 for each launched run r = run_ids[l]; fp32 [L]."""
    n_launch = run_ids_L.shape[0]
    if n_launch == 0:
        return torch.zeros(0, dtype=torch.float32, device=x_NI.device)
    # One partial per (run, O/I tile); the tile count depends on the autotuned config, so size
    # the buffer for the smallest tiles (unused cells stay zero: see reset_to_zero).
    min_o = min(c.kwargs["BLOCK_O"] for c in _segment_outer_kernel.configs)
    min_i = min(c.kwargs["BLOCK_I"] for c in _segment_outer_kernel.configs)
    max_tiles = triton.cdiv(grad_NO.shape[1], min_o) * triton.cdiv(x_NI.shape[1], min_i)
    partials = torch.zeros(n_launch, max_tiles, dtype=torch.float32, device=x_NI.device)
    _launch_segment_outer(
        grad_NO,
        x_NI,
        None,
        partials,
        run_offsets_R1,
        run_ids_L,
        None,
        order_N,
        gather_g=gather_g,
        gather_x=gather_x,
        norm2=True,
    )
    return partials.sum(dim=1)
