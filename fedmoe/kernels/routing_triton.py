"""Fused top-k router in Triton: scores, bias, group mask, top-k, weights and counts in one pass.

Op (see fedmoe/kernels/routing.py for the contract and the reference), per token t:
    s_te = sigmoid(l_te) or softmax_e(l_te)                  fp32, whatever the logits dtype
    c_te = s_te + b_e                                          selection only
    groups of E/G experts scored by top-2 sum or max of c; keep the best topk_group groups
    ids_t = top-k of c_t over kept experts;  w_tk = s_t,ids_tk (/ sum_k) * scale
    counts_e += #{(t, k): ids_tk = e}

One program routes BLOCK_T tokens with the whole expert row in registers (E <= 1024), so
the scores never go back to memory. Top-k is K rounds of argmax-and-mask: K is small (<= 8)
and this keeps torch.topk's choice for distinct scores. Forward only: the dispatcher recomputes
the K gathered weights with torch ops when a gradient w.r.t. the logits is needed.

Legend: T tokens, E experts, K experts per token, G expert groups; *_PAD = next power of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedmoe.kernels.triton_common import next_pow2


@triton.jit
def _route_kernel(
    # inputs: logits [T, E] (any float dtype), selection bias [E] fp32 (read only if HAS_BIAS)
    logits_ptr,
    bias_ptr,
    # outputs: combine weights [T, K] fp32, expert ids [T, K] int64, counts [E] int32 (zeroed)
    weights_ptr,
    ids_ptr,
    counts_ptr,
    # sizes, strides and the runtime scale
    T,
    stride_lt,
    stride_le,
    routed_scaling_factor,
    # routing spec
    N_EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_TOP2: tl.constexpr,
    NORMALIZE: tl.constexpr,
    # tile sizes
    BLOCK_T: tl.constexpr,
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    G_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < T
    col_ok = cols < N_EXPERTS
    tile_ok = row_ok[:, None] & col_ok[None, :]

    logits = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le, mask=tile_ok, other=0.0).to(
        tl.float32
    )
    if SOFTMAX:
        z = tl.where(col_ok[None, :], logits, float("-inf"))
        num = tl.exp(z - tl.max(z, axis=1)[:, None])
        scores = num / tl.sum(num, axis=1)[:, None]
    else:
        scores = tl.sigmoid(logits)

    # Selection scores: bias added, padded experts never chosen.
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    choice = tl.where(col_ok[None, :], choice, float("-inf"))

    # Group-limited routing: score each group, keep the TOPK_GROUP best, mask the rest.
    if N_GROUP > 1 and TOPK_GROUP < N_GROUP:
        GROUP_SIZE: tl.constexpr = N_EXPERTS // N_GROUP
        group_of_col = cols // GROUP_SIZE
        gcols = tl.arange(0, G_PAD)
        group_scores = tl.full([BLOCK_T, G_PAD], float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            in_group = tl.where((group_of_col == g)[None, :], choice, float("-inf"))
            best = tl.max(in_group, axis=1)
            if GROUP_TOP2 and GROUP_SIZE > 1:
                first = tl.argmax(in_group, axis=1)
                best += tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), in_group), axis=1)
            group_scores = tl.where(gcols[None, :] == g, best[:, None], group_scores)
        keep = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            g_best = tl.argmax(group_scores, axis=1)
            keep = tl.where(group_of_col[None, :] == g_best[:, None], 1, keep)
            group_scores = tl.where(gcols[None, :] == g_best[:, None], float("-inf"), group_scores)
        choice = tl.where(keep != 0, choice, float("-inf"))

    # Top-k: K rounds of argmax; gather the bias-free score of each pick.
    kcols = tl.arange(0, K_PAD)
    w_tile = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    id_tile = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int64)
    hist = tl.zeros([E_PAD], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        pick = tl.argmax(choice, axis=1)
        hit = cols[None, :] == pick[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        w_tile = tl.where(kcols[None, :] == k, w[:, None], w_tile)
        id_tile = tl.where(kcols[None, :] == k, pick[:, None].to(tl.int64), id_tile)
        hist += tl.sum((hit & row_ok[:, None]).to(tl.int32), axis=0)
        choice = tl.where(hit, float("-inf"), choice)

    if NORMALIZE:
        w_tile = w_tile / (tl.sum(w_tile, axis=1)[:, None] + 1e-20)
    w_tile = w_tile * routed_scaling_factor

    out_ok = row_ok[:, None] & (kcols[None, :] < TOP_K)
    out_offsets = rows[:, None] * TOP_K + kcols[None, :]
    tl.store(weights_ptr + out_offsets, w_tile, mask=out_ok)
    tl.store(ids_ptr + out_offsets, id_tile, mask=out_ok)
    tl.atomic_add(counts_ptr + cols, hist, mask=col_ok)


def route_triton(
    logits_TE: torch.Tensor,
    correction_bias_E: torch.Tensor | None,
    *,
    top_k: int,
    softmax: bool,
    n_group: int,
    topk_group: int,
    group_top2: bool,
    normalize: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the router; returns (weights_TK fp32, ids_TK int64, counts_E int64), no autograd."""
    T, E = logits_TE.shape
    device = logits_TE.device
    weights_TK = torch.empty(T, top_k, dtype=torch.float32, device=device)
    ids_TK = torch.empty(T, top_k, dtype=torch.int64, device=device)
    counts_E = torch.zeros(E, dtype=torch.int32, device=device)
    bias_E = correction_bias_E.float().contiguous() if correction_bias_E is not None else weights_TK
    e_pad = next_pow2(E)
    block_t = max(1, min(64, 4096 // e_pad))  # ~4K fp32 scores per program in registers
    if T:
        _route_kernel[(triton.cdiv(T, block_t),)](
            logits_TE,
            bias_E,
            weights_TK,
            ids_TK,
            counts_E,
            T,
            logits_TE.stride(0),
            logits_TE.stride(1),
            float(routed_scaling_factor),
            N_EXPERTS=E,
            TOP_K=top_k,
            SOFTMAX=softmax,
            HAS_BIAS=correction_bias_E is not None,
            N_GROUP=n_group,
            TOPK_GROUP=topk_group,
            GROUP_TOP2=group_top2,
            NORMALIZE=normalize,
            BLOCK_T=block_t,
            E_PAD=e_pad,
            K_PAD=next_pow2(top_k),
            G_PAD=next_pow2(n_group),
        )
    return weights_TK, ids_TK, counts_E.long()
