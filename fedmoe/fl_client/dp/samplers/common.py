"""What the samplers share: the per-layer norm method, its cost rule, the clipped-sum registry.

Opacus keys its sampler registries by layer class, so a choice that differs between two layers
of one class (mixed ghost clipping) has to travel with the layer instance: the trainer sets
`NORM_METHOD_ATTR` on each trainable layer from `plan_norm_methods` and removes it afterwards.
A layer without the attribute gets the cost rule (experts) or Opacus' own behaviour (nn.Linear).

Clipped-sum samplers (book-keeping, used by grad_sample_mode="mixed"): given a layer's inputs,
its per-sample output gradients and the clip factors c_b, return sum_b c_b G_b for each of its
parameters *without* instantiating G_b -- for a layer linear in its weight that is the ordinary
weight gradient with every sample's output gradient scaled by c_b. Opacus has no such registry;
`CLIPPED_SUM_SAMPLERS` is ours, keyed by layer class like Opacus' two.

Legend: B samples, S rows per sample through the layer (tokens, or tokens x top-k slots for an
expert bank), E experts (1 for a plain linear), I input width, O output width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from torch import nn

NormMethod = Literal["ghost", "instantiate"]
NORM_METHODS: tuple[str, ...] = ("ghost", "instantiate")
NORM_METHOD_ATTR = "_fedmoe_norm_method"


def norm_method_of(module: nn.Module) -> NormMethod | None:
    """The norm method the trainer planned for this layer, or None when it planned none."""
    return getattr(module, NORM_METHOD_ATTR, None)


def ghost_is_cheaper(*, rows_per_sample: int, n_experts: int, in_features: int, out_features: int) -> bool:
    """Mixed ghost clipping's per-layer rule: True when the ghost norm costs less than instantiating.

    Per sample, instantiating G_b = sum_s g_s x_s^T costs S*I*O multiply-adds and writes E*O*I
    numbers (read twice more: norm, then clip). The ghost form ||G_b||^2 = sum over row pairs of
    the same expert of <x_s, x_s'><g_s, g_s'> costs the two Gram matrices of each (sample,
    expert) segment: with balanced routing S/E rows each, E * (S/E)^2 * (I + O) = S^2 (I + O) / E.
    So ghost wins iff S (I + O) < E I O. For a plain linear (E = 1) this is the time form of Bu et
    al.'s mixed ghost clipping rule (arXiv:2205.10683, which states the space form 2 T^2 < I O);
    the issue's `2 (T k)^2 < E d f` is that space form for an expert bank. We use the time form:
    the ghost Grams are per (sample, expert) segment, so their memory is S^2/E, not S^2, and the
    space form sends e.g. the small preset's down_proj (S=512, E*D*F = 2*S^2) to instantiation
    although the ghost norm is ~2.7x cheaper there. LoRA factors (I or O = rank) always
    instantiate: rank-wide per-sample gradients are tiny.
    """
    s, e, i, o = rows_per_sample, max(n_experts, 1), in_features, out_features
    return s * (i + o) < e * i * o


def norms_from_grad_samples(grad_samples: dict[nn.Parameter, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample L2 norms [B] of instantiated per-sample gradients [B, ...]."""
    return {p: gs.reshape(gs.shape[0], -1).norm(2, dim=-1) for p, gs in grad_samples.items()}


GradSampler = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], dict[nn.Parameter, torch.Tensor]]


def register_instantiating_samplers(*layer_classes: type[nn.Module]) -> Callable[[GradSampler], GradSampler]:
    """Decorator: `fn` becomes the Opacus grad sampler of `layer_classes`, and the norms of the
    per-sample gradients it returns their norm sampler (for layers whose gradient is small)."""

    def decorator(fn: GradSampler) -> GradSampler:
        def norm_sampler(
            layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
        ) -> dict[nn.Parameter, torch.Tensor]:
            return norms_from_grad_samples(fn(layer, activations, backprops))

        norm_sampler.__qualname__ = f"{fn.__qualname__}.norms"
        register_grad_sampler(list(layer_classes))(fn)
        register_norm_sampler(list(layer_classes))(norm_sampler)
        return fn

    return decorator


ClippedSumSampler = Callable[
    [nn.Module, list[torch.Tensor], torch.Tensor, torch.Tensor], dict[nn.Parameter, torch.Tensor]
]
CLIPPED_SUM_SAMPLERS: dict[type[nn.Module], ClippedSumSampler] = {}


def register_clipped_sum_sampler(
    *layer_classes: type[nn.Module], force: bool = False
) -> Callable[[ClippedSumSampler], ClippedSumSampler]:
    """Decorator: `fn(layer, activations, backprops_per_sample, clip_factors_B) -> {param: sum_b c_b G_b}`.

    Raises:
        ValueError: a class already has one and force is False (names the registered function).
    """

    def decorator(fn: ClippedSumSampler) -> ClippedSumSampler:
        for cls in layer_classes:
            if cls in CLIPPED_SUM_SAMPLERS and not force:
                held = CLIPPED_SUM_SAMPLERS[cls].__qualname__
                raise ValueError(
                    f"clipped-sum sampler for {cls.__name__}: already registered ({held}); pass force=True"
                )
            CLIPPED_SUM_SAMPLERS[cls] = fn
        return fn

    return decorator


def scale_per_sample(backprops_B: torch.Tensor, clip_factors_B: torch.Tensor) -> torch.Tensor:
    """backprops [B, ...] with sample b multiplied by c_b."""
    return backprops_B * clip_factors_B.to(backprops_B.dtype).view(-1, *([1] * (backprops_B.dim() - 1)))
