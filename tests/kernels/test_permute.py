"""Permute/align: Triton counting sort vs torch's stable argsort; reference invariants."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import TRITON_DEVICE, needs_triton, routed_rows

from fedmoe.kernels import KernelError, align_by_expert, align_reference

# (rows, experts, samples): one row, one block, several blocks (BLOCK = 64), many samples
CASES = [(1, 3, 1), (1, 3, 2), (37, 5, 1), (37, 5, 3), (300, 7, 4), (64, 4, 16)]


@pytest.mark.parametrize(("n_rows", "n_experts", "n_samples"), CASES)
def test_reference_invariants(n_rows: int, n_experts: int, n_samples: int) -> None:
    expert_ids, sample_ids = routed_rows(n_rows, n_experts, n_samples, empty_expert=1)
    align = align_reference(expert_ids, n_experts, sample_ids, n_samples)
    assert torch.equal(align.order_N.sort().values, torch.arange(n_rows))
    keys = (expert_ids * n_samples + sample_ids)[align.order_N]
    assert bool((keys.diff() >= 0).all())
    assert torch.equal(align.counts_E, torch.bincount(expert_ids, minlength=n_experts))
    assert align.counts_E[1] == 0
    offsets = align.segment_offsets_S1.tolist()
    for s in range(align.n_segments):
        run = align.order_N[offsets[s] : offsets[s + 1]]
        assert run.numel() > 0
        assert bool((expert_ids[run] == align.segment_expert_S[s]).all())
        assert bool((sample_ids[run] == align.segment_sample_S[s]).all())
        assert bool((run.diff() > 0).all())  # stable: rows keep their order inside a segment
    assert offsets[-1] == n_rows


@needs_triton
@pytest.mark.parametrize(("n_rows", "n_experts", "n_samples"), CASES)
@pytest.mark.parametrize("with_samples", [True, False])
def test_triton_matches_reference(n_rows: int, n_experts: int, n_samples: int, with_samples: bool) -> None:
    expert_ids, sample_ids = routed_rows(n_rows, n_experts, n_samples, empty_expert=1, device=TRITON_DEVICE)
    if not with_samples:
        sample_ids, n_samples = None, 1
    got = align_by_expert(expert_ids, n_experts, sample_ids, n_samples, backend="triton")
    want = align_reference(expert_ids, n_experts, sample_ids, n_samples)
    for field in ("order_N", "expert_offsets_E1", "segment_offsets_S1", "segment_expert_S", "segment_sample_S"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


@needs_triton
def test_triton_empty_rows() -> None:
    empty = torch.zeros(0, dtype=torch.int64, device=TRITON_DEVICE)
    align = align_by_expert(empty, 4, empty, 2, backend="triton")
    assert align.n_rows == 0 and align.n_segments == 0
    assert torch.equal(align.expert_offsets_E1.cpu(), torch.zeros(5, dtype=torch.int64))


def test_rejects_out_of_range_and_bad_dtype() -> None:
    with pytest.raises(KernelError, match=r"expert_ids must lie in \[0, 4\)"):
        align_by_expert(torch.tensor([0, 4]), 4)
    with pytest.raises(KernelError, match=r"sample_ids must lie in \[0, 2\)"):
        align_by_expert(torch.tensor([0, 1]), 4, torch.tensor([0, 2]), 2)
    with pytest.raises(KernelError, match="int32/int64"):
        align_by_expert(torch.tensor([0.0, 1.0]), 4)
