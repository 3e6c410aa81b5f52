"""Parameter-efficient fine-tuning: LoRA on linears and on stacked expert banks, and train modes.

Federated default is FFA-LoRA (Sun et al., ICLR 2024): the A factors are frozen and identical at
every bank (drawn from the job seed and a fingerprint of the base checkpoint), only B is trained.
Then sum_k w_k B_k A = (sum_k w_k B_k) A, so averaging the banks' B is exactly averaging their
models; training A too would make FedAvg of (A, B) inexact. It also halves the update and the
number of noised coordinates under DP.

Wrappers subclass the layer they wrap, so a checkpoint's keys (`...q_proj.weight`,
`...experts.gate_up_proj.weight`) are unchanged and the adapters add `.lora_A` / `.lora_B`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.model.deepseek import (
    DeepseekForCausalLM,
    ExpertLinear,
    GroupedQueryAttention,
    MultiHeadLatentAttention,
    RoutedExperts,
    Router,
)
from fedmoe.model.errors import ModelError

TrainMode = Literal["lora", "router+experts", "full"]
TRAIN_MODES: tuple[str, ...] = ("lora", "router+experts", "full")
# Attention projections (MLA's and GQA's) and the routed expert banks; "shared_experts" and "mlp"
# (dense) also allowed.
ATTENTION_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "k_proj", "v_proj")
ALL_TARGETS = (*ATTENTION_TARGETS, "experts", "shared_experts", "mlp")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    # MLA: q_proj or q_b_proj, kv_b_proj, o_proj; GQA: q/k/v/o_proj; both: the routed experts
    targets: tuple[str, ...] = ("q_proj", "q_b_proj", "kv_b_proj", "o_proj", "k_proj", "v_proj", "experts")
    train_a: bool = False  # False = FFA-LoRA (exact federated averaging)
    seed: int = 0  # the job seed: every bank of a job draws the same A

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ModelError(f"LoraConfig.rank: expected >= 1, got {self.rank}")
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown:
            raise ModelError(f"LoraConfig.targets: unknown {unknown}; allowed: {list(ALL_TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _generator(seed: int, base_fingerprint: str, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}|{base_fingerprint}|{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _init_a(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    # Kaiming-uniform bound as in the LoRA reference implementation; seeded, so banks agree.
    bound = math.sqrt(3.0 / fan_in)
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


class LoRALinear(nn.Linear):
    """y = x W^T (+ b) + scaling * B(A(x)); W frozen, B zero-initialised."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, gen: torch.Generator) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.scaling = scaling
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        with torch.no_grad():
            self.lora_A.weight.copy_(_init_a((rank, base.in_features), base.in_features, gen))
            self.lora_B.weight.zero_()
        self.to(base.weight.device, base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scaling


class LoRAExpertLinear(ExpertLinear):
    """Per-expert adapters on a stacked bank: A [E, r, in], B [E, out, r], both expert banks."""

    def __init__(self, base: ExpertLinear, rank: int, scaling: float, gen: torch.Generator) -> None:
        nn.Module.__init__(self)
        self.n_experts, self.in_features, self.out_features = base.n_experts, base.in_features, base.out_features
        self.weight = base.weight
        self.scaling = scaling
        self.lora_A = ExpertLinear(base.n_experts, base.in_features, rank)
        self.lora_B = ExpertLinear(base.n_experts, rank, base.out_features)
        with torch.no_grad():
            self.lora_A.weight.copy_(_init_a((base.n_experts, rank, base.in_features), base.in_features, gen))
            self.lora_B.weight.zero_()
        self.to(base.weight.device, base.weight.dtype)

    def forward(self, x_BSI: torch.Tensor, expert_ids_BS: torch.Tensor) -> torch.Tensor:
        adapter = self.lora_B(self.lora_A(x_BSI, expert_ids_BS), expert_ids_BS)
        return super().forward(x_BSI, expert_ids_BS) + adapter * self.scaling


def base_fingerprint(model: DeepseekForCausalLM) -> str:
    """A cheap fingerprint of the base weights: names, shapes and the first values of each."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        if not p.is_meta:  # a meta model (layout only, e.g. at the server) has shapes and no values
            h.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()


def apply_lora(model: DeepseekForCausalLM, cfg: LoraConfig) -> list[str]:
    """Wraps the target layers with adapters in place; returns the wrapped module names."""
    fingerprint = base_fingerprint(model)
    wrapped: list[str] = []
    targets = set(cfg.targets)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            gen = _generator(cfg.seed, fingerprint, full)
            attention = isinstance(parent, (MultiHeadLatentAttention, GroupedQueryAttention))
            if attention and child_name in targets and type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear(child, cfg.rank, cfg.scaling, gen))
            elif isinstance(parent, RoutedExperts) and "experts" in targets and type(child) is ExpertLinear:
                setattr(parent, child_name, LoRAExpertLinear(child, cfg.rank, cfg.scaling, gen))
            elif (
                type(child) is nn.Linear
                and child_name in ("gate_proj", "up_proj", "down_proj")
                and _mlp_kind(parent_name) in targets
            ):
                setattr(parent, child_name, LoRALinear(child, cfg.rank, cfg.scaling, gen))
            else:
                continue
            wrapped.append(full)
    if not wrapped:
        raise ModelError(f"LoRA targets {list(cfg.targets)} matched no layer of this model")
    return wrapped


def _mlp_kind(parent_name: str) -> str:
    if parent_name.endswith("shared_experts"):
        return "shared_experts"
    return "mlp" if parent_name.endswith(".mlp") else ""


def configure_trainable(
    model: DeepseekForCausalLM, mode: TrainMode, lora: LoraConfig | None = None
) -> DeepseekForCausalLM:
    """Freezes/unfreezes parameters for a fine-tuning mode (adding adapters for "lora").

    - "lora": adapters on `lora.targets`; only B trained unless `lora.train_a`.
    - "router+experts": router weights and routed expert banks.
    - "full": every parameter.
    """
    if mode not in TRAIN_MODES:
        raise ModelError(f"train mode: expected one of {list(TRAIN_MODES)}, got {mode!r}")
    model.requires_grad_(mode == "full")
    if mode == "lora":
        lora = lora or LoraConfig()
        apply_lora(model, lora)
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("lora_B.weight") or (lora.train_a and name.endswith("lora_A.weight")))
    elif mode == "router+experts":
        for module in model.modules():
            if isinstance(module, (Router, RoutedExperts)):
                module.requires_grad_(True)
    return model


# --------------------------------------------------------------------------------------------
# Merging: W + scaling * B @ A, for export (never silently dropped)
# --------------------------------------------------------------------------------------------


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAExpertLinear]:
    """Name -> adapter-wrapped module, in module order (empty for a model without LoRA)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExpertLinear))}


@torch.no_grad()
def merged_weight(module: LoRALinear | LoRAExpertLinear) -> torch.Tensor:
    """The base weight with the adapter folded in, computed in fp32, returned in the weight's dtype.

    LoRALinear: W [out, in] + s * B [out, r] @ A [r, in]; LoRAExpertLinear: per expert,
    W [E, out, in] + s * B [E, out, r] @ A [E, r, in].
    """
    a, b = module.lora_A.weight.float(), module.lora_B.weight.float()
    delta = torch.bmm(b, a) if isinstance(module, LoRAExpertLinear) else b @ a
    return (module.weight.float() + module.scaling * delta).to(module.weight.dtype)


def base_state_dict(model: DeepseekForCausalLM) -> dict[str, torch.Tensor]:
    """The model's checkpoint tensors: parameters and persistent buffers, without LoRA factors."""
    state = model.state_dict()
    state = {k: v for k, v in state.items() if ".lora_" not in k}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def merged_state_dict(model: DeepseekForCausalLM) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of the model with every adapter merged in; the model is unchanged."""
    state = base_state_dict(model)
    for name, module in lora_modules(model).items():
        state[f"{name}.weight"] = merged_weight(module)
    return state


@torch.no_grad()
def merge_and_unload(model: DeepseekForCausalLM) -> DeepseekForCausalLM:
    """Folds every adapter into its base weight and puts the plain layer back (PEFT's namesake).

    Returns the same model object, now without LoRA; its forward equals the adapted forward.
    """
    for name, module in lora_modules(model).items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = merged_weight(module)
        with torch.device("meta"):  # shells only; the real tensors are assigned below
            if isinstance(module, LoRAExpertLinear):
                plain: nn.Module = ExpertLinear(module.n_experts, module.in_features, module.out_features)
            else:
                plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        if isinstance(module, LoRALinear) and module.bias is not None:
            plain.bias = module.bias
        plain.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        setattr(parent, child_name, plain)
    return model
