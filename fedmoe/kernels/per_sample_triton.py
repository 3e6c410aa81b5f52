"""Per-sample gradient norms of an expert bank in Triton: the ghost form per (sample, expert).

Op (see fedmoe/kernels/per_sample.py for the contract and the reference). Segment s = the rows of
sample b routed to expert e (one contiguous run after align_by_expert with sample ids):
    ||G_s^T X_s||_F^2 = sum_{n, m in s} <x_n, x_m> <g_n, g_m>  = sum((X_s X_s^T) * (G_s G_s^T))
Cost ~ |s|^2 (I + O) / 2 (only row-block pairs j >= i, off-diagonal ones counted twice) against
|s| O I for instantiating the O x I gradient, so the ghost form wins while |s| < 2 O I / (I + O)
-- nearly always for DP batches, where a sample's rows spread over E experts. The dispatcher
sends larger segments to the instantiating kernel in fedmoe/kernels/expert_gemm_triton.py.

One program per segment walks its row-block pairs; each pair builds both BLOCK_R x BLOCK_R Gram
tiles with tl.dot over the widths and accumulates their elementwise product. No atomics.

Legend: N rows, I input width, O output width, S segments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedmoe.kernels.triton_common import autotune_configs, dot_precision

_GHOST_INTERPRET = triton.Config({"BLOCK_R": 16, "BLOCK_K": 16}, num_warps=1)
_GHOST_CONFIGS = [
    triton.Config({"BLOCK_R": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 16, "BLOCK_K": 128}, num_warps=4, num_stages=3),
]


@triton.autotune(configs=autotune_configs(_GHOST_CONFIGS, _GHOST_INTERPRET), key=["I", "O"])
@triton.jit
def _ghost_norm2_kernel(
    # row matrices: X [*, I] (inputs), G [*, O] (output grads), original row order
    x_ptr,
    g_ptr,
    # output: norm2 [launched segments] fp32
    out_ptr,
    # segments: seg_offsets [S + 1] over sorted positions, seg_ids [launched] -> segment, order [N]
    seg_offsets_ptr,
    seg_ids_ptr,
    order_ptr,
    # widths and strides
    I,
    O,
    stride_xm,
    stride_xi,
    stride_gm,
    stride_go,
    # meta
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = tl.load(seg_ids_ptr + pid)
    p_begin = tl.load(seg_offsets_ptr + seg)
    p_end = tl.load(seg_offsets_ptr + seg + 1)
    ks = tl.arange(0, BLOCK_K)

    total = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)
    for i0 in range(p_begin, p_end, BLOCK_R):
        pos_i = i0 + tl.arange(0, BLOCK_R)
        ok_i = pos_i < p_end
        rows_i = tl.load(order_ptr + pos_i, mask=ok_i, other=0).to(tl.int64)
        for j0 in range(i0, p_end, BLOCK_R):
            pos_j = j0 + tl.arange(0, BLOCK_R)
            ok_j = pos_j < p_end
            rows_j = tl.load(order_ptr + pos_j, mask=ok_j, other=0).to(tl.int64)
            gram_x = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)  # <x_n, x_m>
            for k0 in range(0, I, BLOCK_K):
                k_ok = (k0 + ks) < I
                x_i = tl.load(
                    x_ptr + rows_i[:, None] * stride_xm + (k0 + ks)[None, :] * stride_xi,
                    mask=ok_i[:, None] & k_ok[None, :],
                    other=0.0,
                )
                x_j = tl.load(
                    x_ptr + rows_j[:, None] * stride_xm + (k0 + ks)[None, :] * stride_xi,
                    mask=ok_j[:, None] & k_ok[None, :],
                    other=0.0,
                )
                gram_x = tl.dot(x_i, tl.trans(x_j), gram_x, input_precision=PRECISION)
            gram_g = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)  # <g_n, g_m>
            for k0 in range(0, O, BLOCK_K):
                k_ok = (k0 + ks) < O
                g_i = tl.load(
                    g_ptr + rows_i[:, None] * stride_gm + (k0 + ks)[None, :] * stride_go,
                    mask=ok_i[:, None] & k_ok[None, :],
                    other=0.0,
                )
                g_j = tl.load(
                    g_ptr + rows_j[:, None] * stride_gm + (k0 + ks)[None, :] * stride_go,
                    mask=ok_j[:, None] & k_ok[None, :],
                    other=0.0,
                )
                gram_g = tl.dot(g_i, tl.trans(g_j), gram_g, input_precision=PRECISION)
            pair_weight = tl.where(j0 > i0, 2.0, 1.0)  # block (j, i) mirrors block (i, j)
            total += gram_x * gram_g * pair_weight
    tl.store(out_ptr + pid, tl.sum(tl.sum(total, axis=1), axis=0))


def ghost_norm2_triton(
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    order_N: torch.Tensor,
    seg_offsets_S1: torch.Tensor,
    seg_ids_L: torch.Tensor,
) -> torch.Tensor:
    """||G_s^T X_s||_F^2 for each launched segment s = seg_ids[l], fp32 [L]."""
    out = torch.empty(seg_ids_L.shape[0], dtype=torch.float32, device=x_NI.device)
    if seg_ids_L.shape[0]:
        _ghost_norm2_kernel[(seg_ids_L.shape[0],)](
            x_NI,
            grad_NO,
            out,
            seg_offsets_S1,
            seg_ids_L,
            order_N,
            x_NI.shape[1],
            grad_NO.shape[1],
            x_NI.stride(0),
            x_NI.stride(1),
            grad_NO.stride(0),
            grad_NO.stride(1),
            PRECISION=dot_precision(x_NI.dtype),
        )
    return out
