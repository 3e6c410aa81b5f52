"""Per-sample gradients and gradient norms of a stacked expert bank (`ExpertLinear`) for Opacus.

Layer: y_bs = W[e_bs] x_bs for rows s of sample b (tokens x top-k slots), W [E, O, I].
    per-sample gradient   G_b[e] = sum_{s: e_bs = e} g_bs x_bs^T               [B, E, O, I]
    its squared norm      ||G_b||^2 = sum_e sum_{s, s' in (b, e)} <x_s, x_s'> <g_s, g_s'>   [B]
    the clipped sum       sum_b c_b G_b = weight gradient with g_bs scaled by c_b       [E, O, I]
Rows are grouped into (sample, expert) segments; a segment is one matmul (G = g_seg^T x_seg) or
one pair of Gram matrices (ghost norm), never per-token outer products. The ops are the kernels'
dispatchers (`fedmoe.kernels.expert_grad_sample`, `expert_grad_norm2`, `expert_weight_grad_clipped`:
reference / grouped_mm / Triton), called from one place each below, except the ghost norm on
CPU: the dispatcher's CPU paths instantiate every segment's O x I gradient, and for the widths
where our plan asks for the ghost form the bucketed Gram version is ~2.5x faster
(`fedmoe.kernels.per_sample.expert_grad_norm2_bucketed`; bench numbers in docs/privacy.md).

Opacus calls a sampler with `activations` = the layer's forward inputs as a list ([x, expert_ids]
here: ExpertLinear.forward takes both) and `backprops` = dL/dy, already multiplied by the batch
size when the loss was a mean. The expert ids ride along as the second activation, and the batch
dimension of x_BSI is the sample dimension, so the sampler never sees tokens as samples.

Legend: B samples, S rows per sample, N = B*S rows, E experts, I input width, O output width.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from torch import nn

from fedmoe import kernels
from fedmoe.fl_client.dp.samplers.common import (
    ghost_is_cheaper,
    norm_method_of,
    norms_from_grad_samples,
    register_clipped_sum_sampler,
)
from fedmoe.kernels.per_sample import expert_grad_norm2_bucketed
from fedmoe.model.deepseek import ExpertLinear
from fedmoe.model.lora import LoRAExpertLinear

# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


# The single call site of each op.
def _ghost_norm2(x_NI, grad_NO, ids_N, sample_ids_N, n_samples: int, n_experts: int) -> torch.Tensor:
    if x_NI.is_cuda:  # Triton: ghost or instantiating kernel per segment, whichever is cheaper
        return kernels.expert_grad_norm2(x_NI, grad_NO, ids_N, sample_ids_N, n_samples, n_experts, method="auto")
    return expert_grad_norm2_bucketed(x_NI, grad_NO, ids_N, sample_ids_N, n_samples, n_experts)


def _grad_sample(x_NI, grad_NO, ids_N, sample_ids_N, n_samples: int, n_experts: int) -> torch.Tensor:
    return kernels.expert_grad_sample(x_NI, grad_NO, ids_N, sample_ids_N, n_samples, n_experts)


def _clipped_sum(x_NI, grad_NO, ids_N, sample_ids_N, clip_factor_B, n_experts: int) -> torch.Tensor:
    return kernels.expert_weight_grad_clipped(x_NI, grad_NO, ids_N, sample_ids_N, clip_factor_B, n_experts)


# ---------------------------------------------------------------------------------------------
# Opacus samplers
# ---------------------------------------------------------------------------------------------


def _rows(layer: ExpertLinear, activations: list[torch.Tensor], backprops: torch.Tensor):
    x_BSI, ids_BS = activations[0], activations[1]
    B, S, _ = x_BSI.shape
    grad_NO = backprops.reshape(B * S, layer.out_features)
    x_NI = x_BSI.reshape(B * S, layer.in_features).to(grad_NO.dtype)
    sample_ids_N = torch.arange(B, device=x_BSI.device).repeat_interleave(S)
    return x_NI, grad_NO, ids_BS.reshape(-1), sample_ids_N, B, S


@register_grad_sampler([ExpertLinear, LoRAExpertLinear])
def compute_expert_linear_grad_sample(
    layer: ExpertLinear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient of an expert bank's stacked weight.

    Args:
        layer: the ExpertLinear (or LoRAExpertLinear: its own `weight` only; adapters are
            ExpertLinear children with their own hooks).
        activations: [x_BSI, expert_ids_BS], the forward inputs.
        backprops: dL/dy [B, S, O] (per-sample scaled by Opacus for a mean loss).

    Returns:
        {layer.weight: [B, E, O, I]} when the weight is trainable, else {}.
    """
    if not layer.weight.requires_grad:
        return {}
    x_NI, grad_NO, ids_N, sample_ids_N, B, _ = _rows(layer, activations, backprops)
    return {layer.weight: _grad_sample(x_NI, grad_NO, ids_N, sample_ids_N, B, layer.n_experts)}


@register_norm_sampler([ExpertLinear, LoRAExpertLinear])
def compute_expert_linear_norm_sample(
    layer: ExpertLinear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norm [B] of an expert bank's weight: ghost form or instantiated.

    The method is the one planned for this layer (`common.NORM_METHOD_ATTR`); unplanned layers
    use `ghost_is_cheaper` on the actual shapes. Both give the same norms.
    """
    if not layer.weight.requires_grad:
        return {}
    x_NI, grad_NO, ids_N, sample_ids_N, B, S = _rows(layer, activations, backprops)
    method = norm_method_of(layer)
    if method is None:
        cheaper = ghost_is_cheaper(
            rows_per_sample=S, n_experts=layer.n_experts, in_features=layer.in_features, out_features=layer.out_features
        )
        method = "ghost" if cheaper else "instantiate"
    if method == "ghost":
        norm2 = _ghost_norm2(x_NI, grad_NO, ids_N, sample_ids_N, B, layer.n_experts)
        return {layer.weight: norm2.sqrt().to(grad_NO.dtype)}  # Opacus stacks all layers' norms
    grads = _grad_sample(x_NI, grad_NO, ids_N, sample_ids_N, B, layer.n_experts)
    return norms_from_grad_samples({layer.weight: grads})


@register_clipped_sum_sampler(ExpertLinear, LoRAExpertLinear)
def compute_expert_linear_clipped_sum(
    layer: ExpertLinear, activations: list[torch.Tensor], backprops: torch.Tensor, clip_factors: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """sum_b c_b G_b of an expert bank's weight, [E, O, I] (book-keeping: no per-sample tensor).

    Args:
        layer, activations, backprops: as for the grad sampler (backprops per sample, unscaled).
        clip_factors: c_b [B].
    """
    if not layer.weight.requires_grad:
        return {}
    x_NI, grad_NO, ids_N, sample_ids_N, _, _ = _rows(layer, activations, backprops)
    grad = _clipped_sum(x_NI, grad_NO, ids_N, sample_ids_N, clip_factors, layer.n_experts)
    return {layer.weight: grad.to(layer.weight.dtype)}
