"""Mixed ghost clipping with book-keeping: per-sample clipping in one backward pass.

Opacus' fast gradient clipping runs two backward passes: the first for per-sample gradient norms,
the second for sum_b c_b grad(loss_b). Book-keeping (Bu et al., "Differentially Private
Optimization on Large Model at Small Cost", ICML 2023) keeps each trainable layer's inputs x and
output gradients g from a single pass and finishes every layer by hand:

    1. forward, with hooks keeping each trainable layer's inputs and output;
    2. g = d(sum_b loss_b)/d(output) for every kept output, in one autograd call that skips
       the parameter gradients (nobody asks for them);
    3. per layer, ||G_b||^2 by the ghost form or by instantiating G_b, whichever is cheaper for
       its shape (the per-layer plan; Bu et al., arXiv:2205.10683's mixed ghost clipping);
    4. c_b = min(1, C / (||G_b|| + 1e-6)) over all layers (Opacus' factor);
    5. per layer, p.grad = sum_b c_b G_b: from the instantiated G_b, or as the weight gradient
       with each sample's g scaled by c_b (a clipped-sum sampler: one matmul, no [B, ...] tensor).

The result in p.grad is what Opacus' second backward produces, so DPOptimizerFastGradientClipping
noises, averages and steps it unchanged (and BatchMemoryManager accumulates it across physical
batches). The norms and instantiated gradients come from the same registered Opacus samplers as
the other modes.

Legend: B samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from torch import nn
from torch.utils.hooks import RemovableHandle

from fedmoe.fl_client.dp.errors import DPError
from fedmoe.fl_client.dp.samplers.common import CLIPPED_SUM_SAMPLERS, NORM_METHOD_ATTR

# The clip factor's stabilizer, as in Opacus (DPOptimizer.clip_and_accumulate / get_clipping_coef).
CLIP_EPS = 1e-6


@dataclass
class _Record:
    name: str
    activations: list[torch.Tensor]
    output: torch.Tensor


def _uses_ghost(module: nn.Module) -> bool:
    """Ghost norm + clipped sum for planned-ghost layers and embeddings; instantiate the rest."""
    if (
        type(module) not in CLIPPED_SUM_SAMPLERS
        or type(module) not in GradSampleHooksFastGradientClipping.NORM_SAMPLERS
    ):
        return False
    if isinstance(module, nn.Embedding):
        return True  # Opacus' embedding norm sampler; a [B, V, D] per-sample table is never cheaper
    return getattr(module, NORM_METHOD_ATTR, None) == "ghost"


class BookKeepingClipper:
    """Hooks on every layer with trainable parameters of `model`; see the module docstring.

    Args:
        model: the model (each trainable layer must run at most once per forward).
        clip_norm: C.
    """

    def __init__(self, model: nn.Module, *, clip_norm: float) -> None:
        self.model, self.clip_norm = model, clip_norm
        self.layers = {
            module: name
            for name, module in model.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))
        }
        self.params = [p for module in self.layers for p in module.parameters(recurse=False) if p.requires_grad]
        self._records: list[_Record] = []
        self._handles: list[RemovableHandle] = [m.register_forward_hook(self._capture) for m in self.layers]

    def _capture(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        out = output[0] if isinstance(output, tuple) else output  # Router: (weights, ids)
        assert isinstance(out, torch.Tensor) and out.requires_grad, self.layers[module]
        acts = [t.detach() if isinstance(t, torch.Tensor) else t for t in inputs]
        self._records.append(_Record(self.layers[module], acts, out))

    def __call__(self, *args, **kwargs):
        self._records.clear()
        return self.model(*args, **kwargs)

    def clip_backward(self, per_sample_loss_B: torch.Tensor) -> torch.Tensor:
        """Sets p.grad = sum_b c_b grad(loss_b) for every trainable p; returns the norms ||g_b|| [B]."""
        records, self._records = self._records, []
        names = [r.name for r in records]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise DPError(f"layers {twice} ran more than once in one forward; book-keeping expects once")
        outputs = [r.output for r in records]
        grads = torch.autograd.grad(per_sample_loss_B.sum(), outputs, allow_unused=True)
        with torch.no_grad():
            return self._clip(records, grads, per_sample_loss_B.shape[0], per_sample_loss_B.device)

    def _clip(self, records: list[_Record], grads: tuple, n: int, device: torch.device) -> torch.Tensor:
        norm2_B = torch.zeros(n, dtype=torch.float64, device=device)
        finish: list[tuple[nn.Module, _Record, torch.Tensor, dict[nn.Parameter, torch.Tensor] | None]] = []
        modules = {name: module for module, name in self.layers.items()}
        for record, grad in zip(records, grads, strict=True):
            module = modules[record.name]
            backprops = grad if grad is not None else torch.zeros_like(record.output)
            if _uses_ghost(module):
                norms = GradSampleHooksFastGradientClipping.NORM_SAMPLERS[type(module)](
                    module, record.activations, backprops
                )
                instantiated = None
            else:
                instantiated = GradSampleHooks.GRAD_SAMPLERS[type(module)](module, record.activations, backprops)
                norms = {p: g.reshape(n, -1).norm(2, dim=1) for p, g in instantiated.items()}
            for norm_B in norms.values():
                norm2_B += norm_B.double().pow(2)
            finish.append((module, record, backprops, instantiated))
        norm_B = norm2_B.sqrt()
        factor_B = (self.clip_norm / (norm_B + CLIP_EPS)).clamp(max=1.0)
        done: set[int] = set()
        for module, record, backprops, instantiated in finish:
            if instantiated is None:
                sums = CLIPPED_SUM_SAMPLERS[type(module)](module, record.activations, backprops, factor_B)
            else:
                sums = {p: torch.einsum("b,b...->...", factor_B.to(g.dtype), g) for p, g in instantiated.items()}
            for p, value in sums.items():
                p.grad = value.to(p.dtype)
                done.add(id(p))
        for p in self.params:  # a layer that did not run this batch contributes nothing
            if id(p) not in done:
                p.grad = torch.zeros_like(p)
        return norm_B

    def cleanup(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._records = [], []
