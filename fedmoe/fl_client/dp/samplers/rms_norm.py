"""Per-sample gradients of fedmoe's `RMSNorm` weight for Opacus.

Opacus ships a sampler for torch's `nn.RMSNorm`; ours is a separate class (statistics in fp32,
then cast back), so it needs its own. Layer: y = w * n(x), n(x) = x / rms(x). Per sample b:
    G_b = sum over the sample's positions of g * n(x)                                   [B, D]
Trainable only in "full" mode.

Legend: B samples, D normalized width.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmoe.fl_client.dp.samplers.common import register_instantiating_samplers
from fedmoe.model.deepseek import RMSNorm


@register_instantiating_samplers(RMSNorm)  # norms: instantiated (D numbers per sample)
def compute_rms_norm_grad_sample(
    layer: RMSNorm, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient of an RMSNorm weight.

    Args:
        layer: the RMSNorm.
        activations: [x_B...D], the forward input.
        backprops: dL/dy, same shape (per-sample scaled by Opacus for a mean loss).

    Returns:
        {layer.weight: [B, D]} when trainable, else {}.
    """
    if not layer.weight.requires_grad:
        return {}
    x = activations[0]
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + layer.eps)).to(x.dtype)  # as in forward
    prod = (backprops * normed.to(backprops.dtype)).reshape(x.shape[0], -1, x.shape[-1])
    return {layer.weight: prod.sum(dim=1).to(layer.weight.dtype)}
