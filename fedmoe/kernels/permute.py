"""Permute/align: group rows by (expert, sample) so every expert's rows are one contiguous run.

Math: key_n = expert_n * B + sample_n;  order = stable argsort of key  (sorted position -> row).
    expert e owns sorted positions [expert_offsets[e], expert_offsets[e + 1])
    segment s (a non-empty (expert, sample) pair) owns [segment_offsets[s], segment_offsets[s + 1])
No row is copied and nothing is padded: the GEMM kernels read rows through `order` and find an
expert's run from the offsets (ScatterMoE's scheme). Sorting by sample inside an expert gives the
per-sample ops (fedmoe/kernels/per_sample.py) contiguous (sample, expert) blocks for free. Without
sample ids B = 1 and the segments are the non-empty experts.

Legend: N rows (token x top-k slot), E experts, B samples, S non-empty segments (<= min(N, E*B)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmoe.kernels.backend import Backend, choose_backend, triton_reason
from fedmoe.kernels.errors import KernelError


@dataclass(frozen=True)
class ExpertAlignment:
    """Rows grouped by (expert, sample); all tensors int64 on the rows' device."""

    order_N: torch.Tensor  # sorted position -> original row
    expert_offsets_E1: torch.Tensor  # [E + 1] run boundaries per expert in sorted order
    segment_offsets_S1: torch.Tensor  # [S + 1] run boundaries per non-empty (expert, sample)
    segment_expert_S: torch.Tensor  # [S] expert of each segment
    segment_sample_S: torch.Tensor  # [S] sample of each segment
    n_experts: int
    n_samples: int

    @property
    def n_rows(self) -> int:
        return self.order_N.shape[0]

    @property
    def n_segments(self) -> int:
        return self.segment_expert_S.shape[0]

    @property
    def counts_E(self) -> torch.Tensor:
        return self.expert_offsets_E1.diff()

    def check(self, op: str, n_rows: int, n_experts: int, n_samples: int | None = None) -> None:
        """Raise KernelError unless this alignment was built for these rows/experts/samples."""
        if self.n_rows != n_rows or self.n_experts != n_experts:
            raise KernelError(
                f"{op}: alignment built for N={self.n_rows}, E={self.n_experts}; got N={n_rows}, E={n_experts}"
            )
        if n_samples is not None and self.n_samples != n_samples:
            raise KernelError(
                f"{op}: alignment built for B={self.n_samples} samples (pass sample_ids to align_by_expert), "
                f"got B={n_samples}"
            )


def _alignment_from_counts(
    order_N: torch.Tensor, counts_K: torch.Tensor, n_experts: int, n_samples: int
) -> ExpertAlignment:
    zero = counts_K.new_zeros(1)
    expert_offsets_E1 = torch.cat([zero, counts_K.view(n_experts, n_samples).sum(dim=1).cumsum(0)])
    keys_S = counts_K.nonzero().squeeze(1)
    segment_offsets_S1 = torch.cat([zero, counts_K[keys_S].cumsum(0)])
    return ExpertAlignment(
        order_N=order_N,
        expert_offsets_E1=expert_offsets_E1,
        segment_offsets_S1=segment_offsets_S1,
        segment_expert_S=keys_S // n_samples,
        segment_sample_S=keys_S % n_samples,
        n_experts=n_experts,
        n_samples=n_samples,
    )


def align_reference(
    expert_ids_N: torch.Tensor, n_experts: int, sample_ids_N: torch.Tensor | None = None, n_samples: int = 1
) -> ExpertAlignment:
    """Stable argsort by (expert, sample) in plain PyTorch: the spec."""
    key_N = expert_ids_N.long() * n_samples
    if sample_ids_N is not None:
        key_N = key_N + sample_ids_N.long()
    order_N = torch.argsort(key_N, stable=True)
    counts_K = torch.bincount(key_N, minlength=n_experts * n_samples)
    return _alignment_from_counts(order_N, counts_K, n_experts, n_samples)


def check_ids(name: str, ids_N: torch.Tensor, n_rows: int, bound: int) -> None:
    """Raises KernelError unless ids_N is int32/int64 [n_rows] with values in [0, bound)."""
    if ids_N.shape != (n_rows,) or ids_N.dtype not in (torch.int32, torch.int64):
        raise KernelError(
            f"align_by_expert: {name} must be int32/int64 [N={n_rows}], got {ids_N.dtype} {tuple(ids_N.shape)}"
        )
    if n_rows:
        lo, hi = torch.stack(torch.aminmax(ids_N)).tolist()  # one host sync
        if lo < 0 or hi >= bound:
            raise KernelError(f"align_by_expert: {name} must lie in [0, {bound}), got values in [{lo}, {hi}]")


def align_by_expert(
    expert_ids_N: torch.Tensor,
    n_experts: int,
    sample_ids_N: torch.Tensor | None = None,
    n_samples: int = 1,
    *,
    backend: Backend = "auto",
) -> ExpertAlignment:
    """Group rows by (expert, sample) without copying them.

    Args:
        expert_ids_N: expert of each row, int32/int64 [N], values in [0, n_experts).
        n_experts: E.
        sample_ids_N: sample (batch element) of each row, int [N] in [0, n_samples), or None
            when the caller only needs expert runs (then B = 1).
        n_samples: B.
        backend: "auto", "reference" or "triton" ("grouped_mm" runs the reference).

    Returns:
        An `ExpertAlignment`; its order equals torch's stable argsort of expert * B + sample.

    Raises:
        KernelError: on a shape/dtype mismatch, an id out of range, or an explicit backend that
            cannot run here.
    """
    n_rows = expert_ids_N.shape[0] if expert_ids_N.dim() == 1 else -1
    check_ids("expert_ids", expert_ids_N, n_rows, n_experts)
    if sample_ids_N is None:
        n_samples = 1
    else:
        check_ids("sample_ids", sample_ids_N, n_rows, n_samples)
    tensors = [expert_ids_N] if sample_ids_N is None else [expert_ids_N, sample_ids_N]
    chosen = choose_backend("align_by_expert", backend, {"triton": triton_reason(*tensors)})
    if chosen == "triton":
        from fedmoe.kernels.permute_triton import sort_by_key_triton

        order_N, counts_K = sort_by_key_triton(expert_ids_N, sample_ids_N, n_experts, n_samples)
        return _alignment_from_counts(order_N, counts_K, n_experts, n_samples)
    return align_reference(expert_ids_N, n_experts, sample_ids_N, n_samples)
