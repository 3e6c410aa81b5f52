"""Per-sample gradients of the MoE router weight (`Router`) for Opacus.

Layer: logits_t = W x_t (fp32, W [E, D]); top-k selection (no gradient) and combine weights
w_tk = f(sigmoid/softmax(logits_t))[ids_tk] (differentiable). Per sample b:
    G_b = sum_t (dL/dlogits_t) x_t^T                                                  [B, E, D]
exactly like a linear layer on x.float(). Opacus' backward hook only hands us dL/dw (the
router's first output; the ids are integers), so dL/dlogits is recovered by recomputing the
logits and taking one vector-Jacobian product through the combine weights of the expert ids the
forward chose. The private trainer stashes those ids with a forward hook (`stash_router_ids`):
re-running the top-k on recomputed logits could flip a near-tie (BLAS rounding may differ between
calls), and under ghost clipping a norm computed for another routing than the one the real
gradient took would not bound it. Without a stash (the sampler used on its own) the routing is
re-run. The cost is one [N, D] x [D, E] matmul, small next to the experts.

The router's buffers (`e_score_correction_bias`, frozen during private training; `expert_load`,
a counter the private trainer restores) do not enter the gradient.

Legend: B samples, T tokens, D width, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from fedmoe.fl_client.dp.samplers.common import register_instantiating_samplers
from fedmoe.kernels import combine_weights, route, router_scores
from fedmoe.model.deepseek import Router

ROUTER_IDS_ATTR = "_fedmoe_expert_ids"


def _stash_ids(module: nn.Module, _inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
    if module.training and torch.is_grad_enabled():
        setattr(module, ROUTER_IDS_ATTR, output[1].detach())


def stash_router_ids(model: nn.Module) -> list[RemovableHandle]:
    """Forward hooks keeping each trainable router's chosen expert ids [B, T, K] for its sampler."""
    return [
        m.register_forward_hook(_stash_ids) for m in model.modules() if isinstance(m, Router) and m.weight.requires_grad
    ]


def router_logit_grads(layer: Router, x_BTD: torch.Tensor, grad_weights_BTK: torch.Tensor) -> torch.Tensor:
    """dL/dlogits [B, T, E] (fp32) from dL/d(combine weights) [B, T, K]."""
    B, T, D = x_BTD.shape
    ids_BTK = getattr(layer, ROUTER_IDS_ATTR, None)
    assert ids_BTK is None or ids_BTK.shape[:2] == (B, T), "stashed router ids are from another forward"
    with torch.enable_grad():  # backward hooks run with grad mode off
        logits_NE = F.linear(x_BTD.reshape(B * T, D).float(), layer.weight.detach().float()).requires_grad_(True)
        if ids_BTK is None:
            bias = layer.e_score_correction_bias if layer.uses_bias else None
            weights_NK, _, _ = route(logits_NE, bias, layer.spec)
        else:
            weights_NK = combine_weights(router_scores(logits_NE, layer.spec), ids_BTK.reshape(B * T, -1), layer.spec)
        (grad_NE,) = torch.autograd.grad(
            weights_NK, logits_NE, grad_weights_BTK.reshape(B * T, -1).to(weights_NK.dtype)
        )
    return grad_NE.view(B, T, -1)


# Norms instantiated: E*D per sample is small next to the ghost Grams' T^2 (E + D) for any
# training sequence length.
@register_instantiating_samplers(Router)
def compute_router_grad_sample(
    layer: Router, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient of the router weight.

    Args:
        layer: the Router.
        activations: [x_BTD], the forward input.
        backprops: dL/d(combine weights) [B, T, K] (per-sample scaled by Opacus for a mean loss).

    Returns:
        {layer.weight: [B, E, D]} in the weight's dtype when trainable, else {}.
    """
    if not layer.weight.requires_grad:
        return {}
    x_BTD = activations[0]
    grad_BTE = router_logit_grads(layer, x_BTD, backprops)
    grads = torch.einsum("bte,btd->bed", grad_BTE, x_BTD.float())
    return {layer.weight: grads.to(layer.weight.dtype)}
