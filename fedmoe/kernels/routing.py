"""Top-k expert routing for DeepSeek-style MoE layers.

Math (per token t, experts e = 0..E-1):
    s_te   = sigmoid(logit_te)  (V3)   or   softmax_e(logit_te)  (V2)        -- fp32
    c_te   = s_te + b_e                    selection score; b = correction bias (V3, aux-loss-free)
    groups : experts split into n_group equal groups; a group's score is the sum of its top-2 c
             ("top2_sum", V3) or its max ("max", V2); only the best topk_group groups stay eligible
    ids_t  = top-k of c_t over eligible experts
    w_tk   = s_t,ids_tk   (bias-free!)  -> / sum_k (if norm_topk_prob)  -> * routed_scaling_factor
The bias only changes *which* experts are chosen, never the combine weights.

Backends: reference (below; the spec) and triton (fedmoe/kernels/routing_triton.py: one fused forward
kernel; the dispatcher recomputes the K gathered weights with torch when logits need a gradient).

Legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedmoe.kernels.backend import Backend, choose_backend, triton_reason
from fedmoe.kernels.errors import KernelError

ScoreFunc = Literal["sigmoid", "softmax"]
GroupScore = Literal["top2_sum", "max"]


@dataclass(frozen=True)
class RoutingSpec:
    """Static routing hyper-parameters of one MoE layer (all from the model config)."""

    n_experts: int
    top_k: int
    score_func: ScoreFunc = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = "top2_sum"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.score_func not in ("sigmoid", "softmax"):
            raise KernelError(f"RoutingSpec.score_func: expected 'sigmoid' or 'softmax', got {self.score_func!r}")
        if self.group_score not in ("top2_sum", "max"):
            raise KernelError(f"RoutingSpec.group_score: expected 'top2_sum' or 'max', got {self.group_score!r}")
        if self.n_group < 1 or self.n_experts % self.n_group:
            raise KernelError(f"RoutingSpec: n_experts={self.n_experts} not divisible by n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise KernelError(f"RoutingSpec.topk_group: expected 1..{self.n_group}, got {self.topk_group}")
        eligible = self.topk_group * (self.n_experts // self.n_group)
        if not 1 <= self.top_k <= eligible:
            raise KernelError(f"RoutingSpec.top_k: expected 1..{eligible} eligible experts, got {self.top_k}")


def router_scores(logits_TE: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """s = sigmoid or softmax of the logits, in fp32 (differentiable)."""
    logits_TE = logits_TE.float()
    if spec.score_func == "sigmoid":
        return logits_TE.sigmoid()
    return logits_TE.softmax(dim=-1)


def combine_weights(scores_TE: torch.Tensor, ids_TK: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """w_tk = s_t,ids_tk (/ sum_k if norm_topk_prob) * routed_scaling_factor, differentiable in s."""
    weights_TK = scores_TE.gather(1, ids_TK)
    if spec.norm_topk_prob and spec.top_k > 1:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK * spec.routed_scaling_factor


def route_reference(
    logits_TE: torch.Tensor, correction_bias_E: torch.Tensor | None, spec: RoutingSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference router (the spec every fast path must match).

    Args:
        logits_TE: router logits, any float dtype; computed in fp32 because top-k near-ties
            in bf16 flip expert choices between otherwise identical replicas.
        correction_bias_E: selection-only bias (aux-loss-free balancing) or None.
        spec: routing hyper-parameters.

    Returns:
        weights_TK (fp32 combine weights, differentiable w.r.t. logits), ids_TK (int64),
        counts_E (int64 number of (token, slot) pairs routed to each expert).
    """
    T, E = logits_TE.shape
    if E != spec.n_experts:
        raise KernelError(f"route: logits have {E} experts, spec expects {spec.n_experts}")
    scores_TE = router_scores(logits_TE, spec)
    with torch.no_grad():
        choice_TE = scores_TE.detach()
        if correction_bias_E is not None:
            choice_TE = choice_TE + correction_bias_E.float()
        if spec.n_group > 1 and spec.topk_group < spec.n_group:
            grouped_TGX = choice_TE.view(T, spec.n_group, E // spec.n_group)
            if spec.group_score == "top2_sum":
                group_scores_TG = grouped_TGX.topk(min(2, E // spec.n_group), dim=-1).values.sum(-1)
            else:
                group_scores_TG = grouped_TGX.amax(dim=-1)
            keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_scores_TG.topk(spec.topk_group, dim=-1).indices, True)
            keep_TE = keep_TG.unsqueeze(-1).expand(T, spec.n_group, E // spec.n_group).reshape(T, E)
            choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
        ids_TK = choice_TE.topk(spec.top_k, dim=-1).indices
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=E)
    return combine_weights(scores_TE, ids_TK, spec), ids_TK, counts_E


def _route_triton(
    logits_TE: torch.Tensor, correction_bias_E: torch.Tensor | None, spec: RoutingSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fedmoe.kernels.routing_triton import route_triton

    weights_TK, ids_TK, counts_E = route_triton(
        logits_TE,
        correction_bias_E,
        top_k=spec.top_k,
        softmax=spec.score_func == "softmax",
        n_group=spec.n_group,
        topk_group=spec.topk_group,
        group_top2=spec.group_score == "top2_sum",
        normalize=spec.norm_topk_prob and spec.top_k > 1,
        routed_scaling_factor=spec.routed_scaling_factor,
    )
    if torch.is_grad_enabled() and logits_TE.requires_grad:
        # The kernel is forward-only: the K gathered weights are cheap to redo with autograd.
        weights_TK = combine_weights(router_scores(logits_TE, spec), ids_TK, spec)
    return weights_TK, ids_TK, counts_E


_MAX_TRITON_EXPERTS = 1024


def route(
    logits_TE: torch.Tensor,
    correction_bias_E: torch.Tensor | None,
    spec: RoutingSpec,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing dispatcher; see `route_reference` for the contract.

    Args:
        logits_TE: router logits [T, E], any float dtype.
        correction_bias_E: selection-only bias [E] or None.
        spec: routing hyper-parameters.
        backend: "auto", "reference" or "triton" (see fedmoe.kernels.backend; "grouped_mm" runs the
            reference, routing has no grouped GEMM).

    Returns:
        weights_TK fp32 (differentiable w.r.t. the logits), ids_TK int64, counts_E int64.

    Raises:
        KernelError: on a bad shape, an expert count that disagrees with `spec`, or an explicit
            backend that cannot run here.
    """
    if logits_TE.dim() != 2:
        raise KernelError(f"route: logits must be 2-D [T, E], got shape {tuple(logits_TE.shape)}")
    if logits_TE.shape[1] != spec.n_experts:
        raise KernelError(f"route: logits have {logits_TE.shape[1]} experts, spec expects {spec.n_experts}")
    if correction_bias_E is not None and correction_bias_E.shape != (spec.n_experts,):
        raise KernelError(
            f"route: correction_bias must be [E={spec.n_experts}], got shape {tuple(correction_bias_E.shape)}"
        )
    tensors = [logits_TE] if correction_bias_E is None else [logits_TE, correction_bias_E]
    triton_why = triton_reason(*tensors)
    if triton_why is None and spec.n_experts > _MAX_TRITON_EXPERTS:
        triton_why = f"{spec.n_experts} experts > {_MAX_TRITON_EXPERTS} (one expert row per register tile)"
    chosen = choose_backend("route", backend, {"triton": triton_why})
    if chosen == "triton":
        return _route_triton(logits_TE, correction_bias_E, spec)
    return route_reference(logits_TE, correction_bias_E, spec)
