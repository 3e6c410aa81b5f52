"""Router: Triton kernel vs reference (ids, counts, weights, gradient), reference vs a per-token loop."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import TRITON_DEVICE, assert_close, needs_triton, randn

from fedmoe.kernels import KernelError, RoutingSpec, route, route_reference

SPECS = {
    "v3_groups_bias": RoutingSpec(
        16, 4, "sigmoid", n_group=4, topk_group=2, group_score="top2_sum", routed_scaling_factor=2.5
    ),
    "v2_softmax_max": RoutingSpec(12, 3, "softmax", n_group=3, topk_group=2, group_score="max", norm_topk_prob=False),
    "no_groups_top1": RoutingSpec(8, 1),
    "group_size_one": RoutingSpec(8, 2, "sigmoid", n_group=8, topk_group=4),
    "odd_width": RoutingSpec(10, 3, "sigmoid", n_group=5, topk_group=3),
    "softmax_norm": RoutingSpec(6, 2, "softmax"),
}


def _case(spec: RoutingSpec, n_tokens: int, dtype: torch.dtype, device, bias: bool):
    logits = randn(n_tokens, spec.n_experts, dtype=dtype, device=device, seed=n_tokens, grad=True)
    correction = 0.1 * randn(spec.n_experts, device=device, seed=7) if bias else None
    return logits, correction


def _brute_force_route(logits: torch.Tensor, bias: torch.Tensor | None, spec: RoutingSpec):
    """One token at a time with Python sorting: the reference's math written out plainly."""
    E, size = spec.n_experts, spec.n_experts // spec.n_group
    ids_out, weights_out = [], []
    for row in logits.detach().double():
        scores = row.sigmoid() if spec.score_func == "sigmoid" else row.softmax(-1)
        choice = (scores + (bias.double() if bias is not None else 0)).tolist()
        eligible = list(range(E))
        if spec.n_group > 1 and spec.topk_group < spec.n_group:
            group_scores = []
            for g in range(spec.n_group):
                members = sorted((choice[e] for e in range(g * size, (g + 1) * size)), reverse=True)
                group_scores.append(sum(members[:2]) if spec.group_score == "top2_sum" else members[0])
            kept = sorted(range(spec.n_group), key=lambda g: -group_scores[g])[: spec.topk_group]
            eligible = [e for e in eligible if e // size in kept]
        ids = sorted(eligible, key=lambda e: -choice[e])[: spec.top_k]
        weights = scores[ids]
        if spec.norm_topk_prob and spec.top_k > 1:
            weights = weights / weights.sum()
        ids_out.append(ids)
        weights_out.append(weights * spec.routed_scaling_factor)
    return torch.stack(weights_out), torch.tensor(ids_out)


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_per_token_loop(name: str, bias: bool) -> None:
    spec = SPECS[name]
    logits, correction = _case(spec, 9, torch.float64, "cpu", bias)
    weights, ids, counts = route_reference(logits, correction, spec)
    expected_weights, expected_ids = _brute_force_route(logits, correction, spec)
    assert torch.equal(ids.sort(-1).values, expected_ids.sort(-1).values)
    order = ids.argsort(-1)  # both sides' ids sorted by expert before comparing weights
    exp_order = expected_ids.argsort(-1)
    assert_close(weights.gather(1, order), expected_weights.gather(1, exp_order), torch.float32)  # router is fp32
    assert torch.equal(counts, torch.bincount(expected_ids.flatten(), minlength=spec.n_experts))


@needs_triton
@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("n_tokens", [1, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(name: str, n_tokens: int, dtype: torch.dtype) -> None:
    spec = SPECS[name]
    logits, correction = _case(spec, n_tokens, dtype, TRITON_DEVICE, bias=name != "no_groups_top1")
    weights, ids, counts = route(logits, correction, spec, backend="triton")
    ref_weights, ref_ids, ref_counts = route_reference(logits, correction, spec)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(counts, ref_counts)
    assert weights.dtype == torch.float32
    assert_close(weights, ref_weights, torch.float32)

    grad_out = randn(*weights.shape, device=TRITON_DEVICE, seed=3)
    (grad_logits,) = torch.autograd.grad(weights, logits, grad_out)
    (ref_grad_logits,) = torch.autograd.grad(ref_weights, logits, grad_out)
    assert_close(grad_logits, ref_grad_logits, torch.float32)

    with torch.no_grad():  # forward-only kernel output, no torch recompute
        kernel_weights, kernel_ids, _ = route(logits, correction, spec, backend="triton")
    assert torch.equal(kernel_ids, ref_ids)
    assert_close(kernel_weights, ref_weights.detach(), torch.float32)


def test_bias_changes_choice_not_weights() -> None:
    spec = RoutingSpec(4, 1, norm_topk_prob=False)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    weights, ids, _ = route(logits, bias, spec, backend="reference")
    assert ids.item() == 3
    assert_close(weights, torch.tensor([[torch.sigmoid(torch.tensor(-1.0)).item()]]))


def test_dispatcher_rejects_bad_shapes() -> None:
    spec = RoutingSpec(8, 2)
    with pytest.raises(KernelError, match="2-D"):
        route(torch.zeros(8), None, spec)
    with pytest.raises(KernelError, match="spec expects 8"):
        route(torch.zeros(3, 6), None, spec)
    with pytest.raises(KernelError, match="correction_bias"):
        route(torch.zeros(3, 8), torch.zeros(7), spec)
