"""Stable counting sort of rows by key = expert * B + sample, in two Triton passes.

Op (see fedmoe/kernels/permute.py for the contract and the reference):
    order = argsort(key, stable=True)       without a comparison sort and without padding
Pass 1, one program per BLOCK rows: rank_n = #{m < n in the same block: key_m = key_n} and the
    block's histogram hist[block, key] (the last row of each key in the block stores rank + 1,
    so no atomics are needed and the result is deterministic).
Host (torch, tiny): base[block, key] = #{rows with smaller key} + #{rows with this key in earlier
    blocks} = exclusive cumsum over keys of the totals + exclusive cumsum over blocks.
Pass 2: order[base[block(n), key_n] + rank_n] = n.
Equal keys keep their row order, so the result equals torch's stable argsort exactly.

Legend: N rows, E experts, B samples, NB = ceil(N / BLOCK) row blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 64  # rows per program: the [BLOCK, BLOCK] key comparison stays in registers


@triton.jit
def _rank_in_block_kernel(
    # inputs: expert id [N], sample id [N] (read only if HAS_SAMPLES)
    expert_ids_ptr,
    sample_ids_ptr,
    # outputs: rank within (block, key) [N] int32, histogram [NB, n_keys] int32 (zeroed)
    rank_ptr,
    hist_ptr,
    # sizes
    N,
    n_samples,
    n_keys,
    # meta
    HAS_SAMPLES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    rows = pid * BLOCK + local
    ok = rows < N
    key = tl.load(expert_ids_ptr + rows, mask=ok, other=0).to(tl.int64) * n_samples
    if HAS_SAMPLES:
        key += tl.load(sample_ids_ptr + rows, mask=ok, other=0).to(tl.int64)
    key = tl.where(ok, key, -1)

    same = key[:, None] == key[None, :]  # [BLOCK, BLOCK]
    earlier = local[None, :] < local[:, None]
    later = local[None, :] > local[:, None]
    rank = tl.sum((same & earlier).to(tl.int32), axis=1)
    is_last = tl.sum((same & later).to(tl.int32), axis=1) == 0
    tl.store(rank_ptr + rows, rank, mask=ok)
    tl.store(hist_ptr + pid * n_keys + key, rank + 1, mask=ok & is_last)


@triton.jit
def _scatter_order_kernel(
    # inputs: expert id [N], sample id [N], rank [N], base [NB, n_keys] int64
    expert_ids_ptr,
    sample_ids_ptr,
    rank_ptr,
    base_ptr,
    # output: order [N] int64, sorted position -> row
    order_ptr,
    # sizes
    N,
    n_samples,
    n_keys,
    # meta
    HAS_SAMPLES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    key = tl.load(expert_ids_ptr + rows, mask=ok, other=0).to(tl.int64) * n_samples
    if HAS_SAMPLES:
        key += tl.load(sample_ids_ptr + rows, mask=ok, other=0).to(tl.int64)
    rank = tl.load(rank_ptr + rows, mask=ok, other=0)
    pos = tl.load(base_ptr + pid * n_keys + key, mask=ok, other=0) + rank
    tl.store(order_ptr + pos, rows.to(tl.int64), mask=ok)


def sort_by_key_triton(
    expert_ids_N: torch.Tensor, sample_ids_N: torch.Tensor | None, n_experts: int, n_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch both passes; returns (order_N int64, counts per key [E * B] int64)."""
    N = expert_ids_N.shape[0]
    device = expert_ids_N.device
    n_keys = n_experts * n_samples
    n_blocks = triton.cdiv(N, _BLOCK)
    order_N = torch.empty(N, dtype=torch.int64, device=device)
    if N == 0:
        return order_N, torch.zeros(n_keys, dtype=torch.int64, device=device)
    rank_N = torch.empty(N, dtype=torch.int32, device=device)
    hist_BK = torch.zeros(n_blocks, n_keys, dtype=torch.int32, device=device)
    has_samples = sample_ids_N is not None
    samples = sample_ids_N if has_samples else expert_ids_N
    _rank_in_block_kernel[(n_blocks,)](
        expert_ids_N, samples, rank_N, hist_BK, N, n_samples, n_keys, HAS_SAMPLES=has_samples, BLOCK=_BLOCK
    )
    hist_BK = hist_BK.long()
    counts_K = hist_BK.sum(dim=0)
    base_BK = (counts_K.cumsum(0) - counts_K)[None, :] + (hist_BK.cumsum(0) - hist_BK)
    _scatter_order_kernel[(n_blocks,)](
        expert_ids_N,
        samples,
        rank_N,
        base_BK,
        order_N,
        N,
        n_samples,
        n_keys,
        HAS_SAMPLES=has_samples,
        BLOCK=_BLOCK,
    )
    return order_N, counts_K
