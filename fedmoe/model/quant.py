"""The frozen base in 8 bits: int8 weights with one fp32 scale per output channel.

    W[o, :] ~ q[o, :] * s[o],   s[o] = max_i |W[o, i]| / 127,   q = round(W / s) in [-127, 127]

Expert banks get one scale per (expert, output row). `quantize_frozen_(model)` swaps every frozen
nn.Linear / LoRALinear / ExpertLinear / LoRAExpertLinear / nn.Embedding for an int8 twin of the
same class family (isinstance still holds, state names of the adapters are unchanged). Each
forward dequantizes one layer's weight, uses it and drops it; the backward re-dequantizes it
(`_Int8Linear`, `_Int8ExpertLinear` save only the int8 tensor and the scales), so at no point
are all fp32 base weights alive at once: training memory is int8 base + activations + adapters.

Adapters (lora_A/lora_B), routers, norms and anything trainable stay as they are, so LoRA and the
DP grad samplers see the same trainable modules. Call it after `configure_trainable` (the LoRA
A factors are drawn from a fingerprint of the fp32 base). Export from the fp32 base on disk and
the trained factors (`fedmoe-model export --base ... --trainable ...`), not from a quantized model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.kernels import expert_linear
from fedmoe.model.deepseek import ExpertLinear
from fedmoe.model.lora import LoRAExpertLinear, LoRALinear


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 same shape, scale fp32 = shape[:-1]); w ~ q * scale[..., None]."""
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays exactly zero
    q = torch.round(w32 / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale.unsqueeze(-1)).to(dtype)


class _Int8Linear(torch.autograd.Function):
    """y = x W^T with W dequantized here and again in backward (W is frozen: no weight gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q_OI: torch.Tensor, scale_O: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q_OI, scale_O)
        return F.linear(x, dequantize_rows(q_OI, scale_O, x.dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        q_OI, scale_O = ctx.saved_tensors
        return g @ dequantize_rows(q_OI, scale_O, g.dtype), None, None


class _Int8ExpertLinear(torch.autograd.Function):
    """y[n] = x[n] W[ids[n]]^T over a bank dequantized per call; backward: g[n] W[ids[n]]."""

    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, ids_N: torch.Tensor, q_EOI: torch.Tensor, scale_EO: torch.Tensor):
        ctx.save_for_backward(ids_N, q_EOI, scale_EO)
        return expert_linear(x_NI, ids_N, dequantize_rows(q_EOI, scale_EO, x_NI.dtype))

    @staticmethod
    def backward(ctx, g_NO: torch.Tensor):
        ids_N, q_EOI, scale_EO = ctx.saved_tensors
        w_EIO = dequantize_rows(q_EOI, scale_EO, g_NO.dtype).transpose(1, 2).contiguous()
        return expert_linear(g_NO.contiguous(), ids_N, w_EIO), None, None, None


class _Int8Weight:
    """Mixin: `weight` is read-only and dequantized on access (export/merge code may read it)."""

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    compute_dtype: torch.dtype

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return dequantize_rows(self.weight_q, self.weight_scale, self.compute_dtype)

    def _set_int8(self, w: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        q, scale = shared if shared is not None else quantize_rows(w)
        self.compute_dtype = w.dtype
        nn.Module.register_buffer(self, "weight_q", q)  # type: ignore[arg-type]
        nn.Module.register_buffer(self, "weight_scale", scale)  # type: ignore[arg-type]


class Int8Linear(_Int8Weight, nn.Linear):
    def __init__(self, base: nn.Linear, shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bias = base.bias
        self._set_int8(base.weight, shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Int8Linear.apply(x, self.weight_q, self.weight_scale)
        return y if self.bias is None else y + self.bias


class Int8LoRALinear(_Int8Weight, LoRALinear):
    def __init__(self, base: LoRALinear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bias, self.scaling = base.bias, base.scaling
        self.lora_A, self.lora_B = base.lora_A, base.lora_B
        self._set_int8(base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Int8Linear.apply(x, self.weight_q, self.weight_scale)
        y = y if self.bias is None else y + self.bias
        return y + self.lora_B(self.lora_A(x)) * self.scaling


class Int8ExpertLinear(_Int8Weight, ExpertLinear):
    def __init__(self, base: ExpertLinear) -> None:
        nn.Module.__init__(self)
        self.n_experts, self.in_features, self.out_features = base.n_experts, base.in_features, base.out_features
        self._set_int8(base.weight)

    def forward(self, x_BSI: torch.Tensor, expert_ids_BS: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSI.shape
        y_NO = _Int8ExpertLinear.apply(
            x_BSI.reshape(B * S, -1), expert_ids_BS.reshape(-1), self.weight_q, self.weight_scale
        )
        return y_NO.view(B, S, self.out_features)


class Int8LoRAExpertLinear(_Int8Weight, LoRAExpertLinear):
    def __init__(self, base: LoRAExpertLinear) -> None:
        nn.Module.__init__(self)
        self.n_experts, self.in_features, self.out_features = base.n_experts, base.in_features, base.out_features
        self.scaling, self.lora_A, self.lora_B = base.scaling, base.lora_A, base.lora_B
        self._set_int8(base.weight)

    def forward(self, x_BSI: torch.Tensor, expert_ids_BS: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSI.shape
        y_NO = _Int8ExpertLinear.apply(
            x_BSI.reshape(B * S, -1), expert_ids_BS.reshape(-1), self.weight_q, self.weight_scale
        )
        adapter = self.lora_B(self.lora_A(x_BSI, expert_ids_BS), expert_ids_BS)
        return y_NO.view(B, S, self.out_features) + adapter * self.scaling


class Int8Embedding(_Int8Weight, nn.Embedding):
    """Looks up int8 rows and dequantizes only those (the tied lm_head shares the int8 table)."""

    def __init__(self, base: nn.Embedding) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self._set_int8(base.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight_q[ids].to(torch.float32) * self.weight_scale[ids].unsqueeze(-1)).to(self.compute_dtype)


_TWINS: tuple[tuple[type, type], ...] = (
    (LoRAExpertLinear, Int8LoRAExpertLinear),
    (ExpertLinear, Int8ExpertLinear),
    (LoRALinear, Int8LoRALinear),
    (nn.Embedding, Int8Embedding),
    (nn.Linear, Int8Linear),
)


def _frozen_base(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return isinstance(weight, nn.Parameter) and not weight.requires_grad and weight.is_floating_point()


@torch.no_grad()
def quantize_frozen_(model: nn.Module) -> list[str]:
    """Replaces every frozen base weight of the model by int8 + per-channel scales, in place.

    Returns the names of the quantized modules. A tied lm_head shares the embedding's int8 table.
    Trainable layers (adapters, routers, anything with requires_grad) are left alone.
    """
    done: list[str] = []
    replaced: dict[int, nn.Module] = {}  # id(old weight) -> its int8 twin, for tied weights
    pairs = [(pn, parent, cn, child) for pn, parent in model.named_modules() for cn, child in parent.named_children()]
    pairs.sort(key=lambda pair: not isinstance(pair[3], nn.Embedding))  # embeddings first: a tied lm_head shares
    for parent_name, parent, child_name, child in pairs:
        twin_cls = next((twin for cls, twin in _TWINS if type(child) is cls), None)
        if twin_cls is None or not _frozen_base(child) or child_name in ("lora_A", "lora_B"):
            continue
        tied = replaced.get(id(child.weight))
        if tied is not None and twin_cls is Int8Linear:
            twin = Int8Linear(child, shared=(tied.weight_q, tied.weight_scale))
        else:
            twin = twin_cls(child)
        replaced[id(child.weight)] = twin
        setattr(parent, child_name, twin)
        done.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return done


def int8_bytes(model: nn.Module) -> int:
    """Bytes held by int8 weights and their scales (buffers named weight_q / weight_scale)."""
    seen: set[int] = set()
    total = 0
    for name, t in model.named_buffers():
        if name.endswith(("weight_q", "weight_scale")) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
