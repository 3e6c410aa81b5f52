"""The trainable view: the ordered, named tensors that federation clips, noises, encrypts, averages.

Both sides of a federation compare `layout_hash` (names + shapes, not values) before they trust a
flat vector; `value_hash` lets round 1 check that every bank starts from the same weights.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from fedmoe.model.errors import ModelError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class TrainableView:
    """Ordered name -> parameter for every parameter with requires_grad, in module order."""

    def __init__(self, model: nn.Module) -> None:
        self.params: OrderedDict[str, nn.Parameter] = OrderedDict(
            (name, p) for name, p in model.named_parameters() if p.requires_grad
        )
        if not self.params:
            raise ModelError("trainable view: the model has no trainable parameters")
        self.specs = tuple(TensorSpec(name, tuple(p.shape)) for name, p in self.params.items())

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.specs)

    @property
    def layout_hash(self) -> str:
        return layout_hash(self.specs)

    def flatten(self) -> torch.Tensor:
        """All trainable values as one float32 CPU vector, in view order."""
        return torch.cat([p.detach().reshape(-1).float().cpu() for p in self.params.values()])

    def unflatten(self, flat: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Splits a flat vector back into named tensors (float32, CPU) of the view's shapes."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ModelError(
                f"trainable view: flat vector has shape {tuple(flat.shape)}, expected ({self.numel},) "
                f"for layout {self.layout_hash[:12]}"
            )
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        offset = 0
        for spec in self.specs:
            out[spec.name] = flat[offset : offset + spec.numel].view(spec.shape)
            offset += spec.numel
        return out

    @torch.no_grad()
    def load_flat_(self, flat: torch.Tensor) -> None:
        """Overwrites the trainable parameters with a flat vector (dtype/device of each param)."""
        for name, tensor in self.unflatten(flat).items():
            self.params[name].copy_(tensor)

    @torch.no_grad()
    def add_flat_(self, delta: torch.Tensor) -> None:
        for name, tensor in self.unflatten(delta).items():
            self.params[name].add_(tensor.to(self.params[name].dtype))

    def value_hash(self) -> str:
        return hashlib.sha256(self.flatten().numpy().tobytes()).hexdigest()


def layout_hash(specs: tuple[TensorSpec, ...]) -> str:
    canonical = json.dumps([[s.name, list(s.shape)] for s in specs], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
