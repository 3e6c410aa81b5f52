"""Per-sample expert-bank grads: references vs a per-sample backward loop (float64); Triton and
grouped_mm vs the references (norms in ghost and instantiated form, grad samples, clipped sum)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import (
    TRITON_DEVICE,
    TRITON_DTYPES,
    assert_close,
    brute_force_grad_sample,
    needs_triton,
    randn,
    routed_rows,
)

from fedmoe.kernels import (
    KernelError,
    align_by_expert,
    expert_grad_norm2,
    expert_grad_norm2_bucketed,
    expert_grad_norm2_reference,
    expert_grad_sample,
    expert_grad_sample_reference,
    expert_weight_grad_clipped,
    expert_weight_grad_clipped_reference,
)
from fedmoe.kernels.backend import grouped_mm_reason
from fedmoe.kernels.per_sample import _bucket_bounds

# (rows, experts, samples, in width, out width, expert with no rows)
CASES = [
    (40, 5, 3, 20, 12, 2),  # empty expert; sample 0 never visits the last expert
    (1, 3, 2, 20, 12, None),  # one row: sample 1 has no rows at all
    (80, 2, 1, 19, 13, None),  # 40-row segments: several ghost row blocks; odd widths
    (30, 4, 6, 8, 4, 1),  # many small segments, some samples sparse
    (64, 4, 4, 8, 48, None),  # a rank-wide input (LoRA B): grouped_outer's transposed form
]


def _inputs(case, dtype, device):
    n_rows, n_experts, n_samples, width_in, width_out, empty = case
    expert_ids, sample_ids = routed_rows(n_rows, n_experts, n_samples, empty_expert=empty, device=device, seed=n_rows)
    x = randn(n_rows, width_in, dtype=dtype, device=device, seed=1)
    grad = randn(n_rows, width_out, dtype=dtype, device=device, seed=2)
    clip = torch.rand(n_samples, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    return x, grad, expert_ids, sample_ids, clip, n_samples, n_experts


@pytest.mark.parametrize("case", CASES)
def test_references_match_per_sample_backward(case) -> None:
    x, grad, ids, sids, clip, n_samples, n_experts = _inputs(case, torch.float64, "cpu")
    brute = brute_force_grad_sample(x, grad, ids, sids, n_samples, n_experts)
    assert_close(expert_grad_sample_reference(x, grad, ids, sids, n_samples, n_experts), brute)
    assert_close(expert_grad_norm2_reference(x, grad, ids, sids, n_samples, n_experts), brute.square().sum((1, 2, 3)))
    clipped = (clip[:, None, None, None] * brute).sum(0)
    assert_close(expert_weight_grad_clipped_reference(x, grad, ids, sids, clip, n_experts), clipped)
    # float64 dispatches to the reference on auto (the DP tests rely on it)
    assert_close(expert_grad_norm2(x, grad, ids, sids, n_samples, n_experts), brute.square().sum((1, 2, 3)))


def _compare_fast(case, dtype, device, backend: str, methods: tuple[str, ...]) -> None:
    x, grad, ids, sids, clip, n_samples, n_experts = _inputs(case, dtype, device)
    ref64 = [t.double() if t.is_floating_point() else t for t in (x, grad, ids, sids)]
    want_norm2 = expert_grad_norm2_reference(*ref64, n_samples, n_experts)
    scale = 10.0 * max(1.0, want_norm2.abs().max().item())  # norms are sums of squares: relative
    for method in methods:
        got = expert_grad_norm2(x, grad, ids, sids, n_samples, n_experts, method=method, backend=backend)
        assert got.dtype == torch.float32 and got.shape == (n_samples,)
        assert_close(got, want_norm2, dtype, scale)
    got_gs = expert_grad_sample(x, grad, ids, sids, n_samples, n_experts, backend=backend)
    assert got_gs.dtype == dtype
    assert_close(got_gs, expert_grad_sample_reference(*ref64, n_samples, n_experts), dtype, 10.0)
    got_clip = expert_weight_grad_clipped(x, grad, ids, sids, clip, n_experts, backend=backend)
    assert got_clip.dtype == dtype
    assert_close(got_clip, expert_weight_grad_clipped_reference(*ref64, clip, n_experts), dtype, 10.0)


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_matches_reference(case, dtype) -> None:
    _compare_fast(case, dtype, TRITON_DEVICE, "triton", ("ghost", "instantiate", "auto"))


@pytest.mark.parametrize("case", CASES)
def test_grouped_mm_matches_reference(case) -> None:
    x, grad, ids, sids, clip, n_samples, n_experts = _inputs(case, torch.float32, "cpu")
    if grouped_mm_reason(x, grad, widths=(x.shape[1], grad.shape[1])) is not None:
        with pytest.raises(KernelError, match="grouped_mm"):
            expert_grad_norm2(x, grad, ids, sids, n_samples, n_experts, backend="grouped_mm")
        return
    _compare_fast(case, torch.float32, "cpu", "grouped_mm", ("ghost", "instantiate", "auto"))


def test_grouped_mm_auto_mixes_ghost_and_instantiated_segments() -> None:
    """Segments of 1-2 rows (ghost is cheaper) beside segments of 30 (instantiating is): one call."""
    n_experts, n_samples, width_in, width_out = 3, 2, 16, 8  # ghost iff rows <= 2 I O / (I + O) = 10.7
    experts = [0] * 30 + [1] + [2, 2] + [0] + [1] * 30 + [2] * 5
    samples = [0] * 33 + [1] * 36
    ids, sids = torch.tensor(experts), torch.tensor(samples)
    x = randn(len(experts), width_in, dtype=torch.float32, device="cpu", seed=4)
    grad = randn(len(experts), width_out, dtype=torch.float32, device="cpu", seed=5)
    want = expert_grad_norm2_reference(x.double(), grad.double(), ids, sids, n_samples, n_experts)
    got = expert_grad_norm2(x, grad, ids, sids, n_samples, n_experts, method="auto", backend="grouped_mm")
    assert_close(got, want, torch.float32, 10.0 * want.max().item())


def test_bucketed_ghost_norm_on_skewed_segments() -> None:
    """Segment lengths 1..60 (several buckets, padded lengths rounded up to 8, pad rows) vs the
    float64 reference; every bucket keeps its lengths within min_fill of its longest."""
    gen = torch.Generator().manual_seed(7)
    n_samples, n_experts = 5, 6
    lengths = torch.randint(1, 61, (n_samples, n_experts), generator=gen)
    lengths[1, 2] = 0  # a sample that skips an expert
    sids = torch.arange(n_samples).repeat_interleave(lengths.sum(1))
    ids = torch.cat([torch.arange(n_experts).repeat_interleave(row) for row in lengths])
    shuffle = torch.randperm(ids.shape[0], generator=gen)
    ids, sids = ids[shuffle], sids[shuffle]
    x = randn(ids.shape[0], 24, dtype=torch.float64, device="cpu", seed=8)
    grad = randn(ids.shape[0], 40, dtype=torch.float64, device="cpu", seed=9)
    want = expert_grad_norm2_reference(x, grad, ids, sids, n_samples, n_experts)
    got = expert_grad_norm2_bucketed(x, grad, ids, sids, n_samples, n_experts)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    desc = sorted(lengths.flatten().tolist(), reverse=True)
    bounds = _bucket_bounds(desc, 0.9)
    assert len(bounds) > 4 and bounds[0][0] == 0 and bounds[-1][1] == len(desc) - 1  # the 0 is dropped
    assert all(desc[hi - 1] >= 0.9 * desc[lo] for lo, hi in bounds)


@needs_triton
def test_shared_alignment() -> None:
    x, grad, ids, sids, clip, n_samples, n_experts = _inputs(CASES[0], torch.float32, TRITON_DEVICE)
    align = align_by_expert(ids, n_experts, sids, n_samples)
    assert_close(
        expert_grad_norm2(x, grad, ids, sids, n_samples, n_experts, alignment=align, backend="triton"),
        expert_grad_norm2_reference(x, grad, ids, sids, n_samples, n_experts),
        scale=100.0,
    )
    assert_close(
        expert_weight_grad_clipped(x, grad, ids, sids, clip, n_experts, alignment=align, backend="triton"),
        expert_weight_grad_clipped_reference(x, grad, ids, sids, clip, n_experts),
    )
    expert_only = align_by_expert(ids, n_experts)
    with pytest.raises(KernelError, match="built for B=1"):
        expert_grad_norm2(x, grad, ids, sids, n_samples, n_experts, alignment=expert_only, backend="triton")


def test_validation_messages() -> None:
    x, grad, ids, sids, clip, n_samples, n_experts = _inputs(CASES[0], torch.float32, "cpu")
    with pytest.raises(KernelError, match="same N"):
        expert_grad_norm2(x, grad[:5], ids, sids, n_samples, n_experts)
    with pytest.raises(KernelError, match="sample_ids must be int"):
        expert_grad_sample(x, grad, ids, sids.float(), n_samples, n_experts)
    with pytest.raises(KernelError, match="method"):
        expert_grad_norm2(x, grad, ids, sids, n_samples, n_experts, method="fast")
    with pytest.raises(KernelError, match="clip_factor"):
        expert_weight_grad_clipped(x, grad, ids, sids, clip[:, None], n_experts)
    with pytest.raises(KernelError, match=r"sample_ids must lie in \[0, 2\)"):
        expert_grad_norm2(x, grad, ids, sids, 2, n_experts)
