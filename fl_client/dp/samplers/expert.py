"""Per-sample gradients and gradient norms of a stacked expert bank (`ExpertLinear`) for Opacus.

Layer: y_bs = W[e_bs] x_bs for rows s of sample b (tokens x top-k slots), W [E, O, I].
    per-sample gradient   G_b[e] = sum_{s: e_bs = e} g_bs x_bs^T               [B, E, O, I]
    its squared norm      ||G_b||^2 = sum_e sum_{s, s' in (b, e)} <x_s, x_s'> <g_s, g_s'>   [B]
    the clipped sum       sum_b c_b G_b = weight gradient with g_bs scaled by c_b       [E, O, I]
Rows are grouped into (sample, expert) segments by one stable sort of key = b*E + e; a segment
is one matmul (G = g_seg^T x_seg) or one pair of Gram matrices (ghost norm), never per-token
outer products. The segments are padded to the longest one so each op is a single batched
matmul over B*E segments (padding rows are zero and add nothing).

Opacus calls a sampler with `activations` = the layer's forward inputs as a list ([x, expert_ids]
here: ExpertLinear.forward takes both) and `backprops` = dL/dy, already multiplied by the batch
size when the loss was a mean. The expert ids ride along as the second activation, and the batch
dimension of x_BSI is the sample dimension, so the sampler never sees tokens as samples.

Legend: B samples, S rows per sample, N = B*S rows, E experts, I input width, O output width,
L longest segment.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from torch import nn

from fl_client.dp.samplers.common import (
    ghost_is_cheaper,
    norm_method_of,
    norms_from_grad_samples,
    register_clipped_sum_sampler,
)
from model.deepseek import ExpertLinear
from model.lora import LoRAExpertLinear

# ---------------------------------------------------------------------------------------------
# Plain-torch ops (the spec; kernels.expert_grad_sample / expert_grad_norm2 are their fast twins)
# ---------------------------------------------------------------------------------------------


def _padded_segments(
    x_NI: torch.Tensor, grad_NO: torch.Tensor, expert_ids_N: torch.Tensor, sample_ids_N: torch.Tensor, n_segments: int,
    n_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by (sample, expert) segment, zero-padded: x [B*E, L, I], g [B*E, L, O]."""
    key_N = sample_ids_N * n_experts + expert_ids_N
    order_N = torch.argsort(key_N, stable=True)
    counts = torch.bincount(key_N, minlength=n_segments)
    longest = int(counts.max()) if key_N.numel() else 0
    key_sorted_N = key_N[order_N]
    starts = torch.cumsum(counts, 0) - counts
    pos_N = torch.arange(key_N.numel(), device=key_N.device) - starts[key_sorted_N]
    x_pad = x_NI.new_zeros(n_segments, longest, x_NI.shape[1])
    g_pad = grad_NO.new_zeros(n_segments, longest, grad_NO.shape[1])
    x_pad[key_sorted_N, pos_N] = x_NI[order_N]
    g_pad[key_sorted_N, pos_N] = grad_NO[order_N]
    return x_pad, g_pad


def expert_grad_sample_reference(
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    expert_ids_N: torch.Tensor,
    sample_ids_N: torch.Tensor,
    n_samples: int,
    n_experts: int,
) -> torch.Tensor:
    """Per-sample expert-bank gradients G[b, e] = sum_{n: sample b, expert e} grad_n x_n^T, [B, E, O, I]."""
    x_pad, g_pad = _padded_segments(x_NI, grad_NO, expert_ids_N, sample_ids_N, n_samples * n_experts, n_experts)
    grads = torch.bmm(g_pad.transpose(1, 2), x_pad)  # (B*E, O, I)
    return grads.view(n_samples, n_experts, grad_NO.shape[1], x_NI.shape[1])


def expert_grad_norm2_reference(
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    expert_ids_N: torch.Tensor,
    sample_ids_N: torch.Tensor,
    n_samples: int,
    n_experts: int,
) -> torch.Tensor:
    """Squared per-sample gradient norms [B] by the ghost form, without instantiating G."""
    x_pad, g_pad = _padded_segments(x_NI, grad_NO, expert_ids_N, sample_ids_N, n_samples * n_experts, n_experts)
    gram_x = torch.bmm(x_pad, x_pad.transpose(1, 2))  # (B*E, L, L) <x_s, x_s'>
    gram_g = torch.bmm(g_pad, g_pad.transpose(1, 2))  # (B*E, L, L) <g_s, g_s'>
    return (gram_x * gram_g).sum(dim=(1, 2)).view(n_samples, n_experts).sum(dim=1).clamp(min=0)


def expert_weight_grad_clipped_reference(
    x_NI: torch.Tensor,
    grad_NO: torch.Tensor,
    expert_ids_N: torch.Tensor,
    sample_ids_N: torch.Tensor,
    clip_factor_B: torch.Tensor,
    n_experts: int,
) -> torch.Tensor:
    """sum_b c_b G_b = sum_n c_{sample(n)} grad_n x_n^T per expert, [E, O, I], never per sample."""
    scaled_NO = grad_NO * clip_factor_B.to(grad_NO.dtype)[sample_ids_N].unsqueeze(1)
    no_samples_N = torch.zeros_like(sample_ids_N)
    x_pad, g_pad = _padded_segments(x_NI, scaled_NO, expert_ids_N, no_samples_N, n_experts, n_experts)
    return torch.bmm(g_pad.transpose(1, 2), x_pad)


# The single call site for each op: swap in the kernels' dispatchers here.
expert_grad_sample = expert_grad_sample_reference
expert_grad_norm2 = expert_grad_norm2_reference
expert_weight_grad_clipped = expert_weight_grad_clipped_reference


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
    return {layer.weight: expert_grad_sample(x_NI, grad_NO, ids_N, sample_ids_N, B, layer.n_experts)}


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
        norm2 = expert_grad_norm2(x_NI, grad_NO, ids_N, sample_ids_N, B, layer.n_experts)
        return {layer.weight: norm2.sqrt()}
    grads = expert_grad_sample(x_NI, grad_NO, ids_N, sample_ids_N, B, layer.n_experts)
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
    grad = expert_weight_grad_clipped(x_NI, grad_NO, ids_N, sample_ids_N, clip_factors, layer.n_experts)
    return {layer.weight: grad.to(layer.weight.dtype)}
