"""DeepSeek-V2/V3-architecture causal LM in plain PyTorch, readable top to bottom.

Order: config + presets, RMSNorm, rotary embedding (incl. YaRN), Multi-head Latent Attention,
dense MLP, expert banks, router, MoE layer, decoder block, model. A smoke run sits at the bottom.

Shape legend: B batch, T sequence length, D hidden width, H attention heads, E routed experts,
K experts per token, F expert intermediate width, V vocabulary, R low-rank (latent) width.
Names carry their shape as a suffix (`x_BTD`) where it helps.

The model knows nothing of federation or privacy. Expert dispatch goes through `kernels`
(`route` and `expert_linear`) so the fast paths can be swapped in without touching this file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.kernels import RoutingSpec, expert_linear, route
from fedmoe.model.errors import ModelError
from fedmoe.protocol.files import read_document

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek-V2/V3-style MoE LM (field names follow HF `config.json`)."""

    vocab_size: int = 320
    hidden_size: int = 64
    intermediate_size: int = 128  # dense MLP width (first `first_k_dense_replace` layers)
    moe_intermediate_size: int = 32  # width of one routed / shared expert
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    # Multi-head Latent Attention
    q_lora_rank: int | None = 32  # None: full-rank q_proj (V2-Lite)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    attention_bias: bool = False  # MLA: q_a/kv_a/o biases; GQA: q/k/v/o biases (Llama's field)
    # "mla": DeepSeek's Multi-head Latent Attention; "gqa": Llama/Qwen2/Mixtral grouped-query
    # attention (q/k/v/o projections, rotate-half RoPE over the whole head_dim)
    attention: Literal["mla", "gqa"] = "mla"
    num_key_value_heads: int | None = None  # GQA only; None = num_attention_heads
    head_dim: int | None = None  # GQA only; None = hidden_size // num_attention_heads
    qkv_bias: bool = False  # GQA only: biases on q/k/v but not o (Qwen2's field)
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    # Shared expert width; None = moe_intermediate_size * n_shared_experts (Qwen2-MoE sets its own)
    shared_expert_intermediate_size: int | None = None
    # Qwen2-MoE: the shared expert's output is scaled by sigmoid(x . w_gate), w_gate [1, D]
    shared_expert_gate: bool = False
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 4
    topk_group: int = 2
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    # "noaux_tc" (V3: sigmoid + correction bias, groups scored by top-2 sum),
    # "group_limited_greedy" (V2: groups scored by max), "greedy" (no group limit)
    topk_method: Literal["noaux_tc", "group_limited_greedy", "greedy"] = "noaux_tc"
    # Aux-loss-free balancing: bias_e += gamma * sign(mean_load - load_e) after each step.
    # 0 disables. (DeepSeek-V3 paper, sec. 2.1.2; not an HF field.)
    bias_update_speed: float = 0.001
    # Norms, positions, embeddings
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type"/"rope_type": "yarn", "factor": ..., ...}
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # Which HF family config.json and the checkpoint keys follow (see fedmoe.model.families).
    model_type: Literal["deepseek_v2", "deepseek_v3", "llama", "qwen2_moe", "mixtral"] = "deepseek_v3"
    # Not architectural: who uses the tokens.
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ModelError(f"ModelConfig: {what}")

        _check_field_types(self)
        need(self.hidden_act == "silu", f"hidden_act: expected 'silu', got {self.hidden_act!r}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(
            self.scoring_func in ("sigmoid", "softmax"),
            f"scoring_func: expected 'sigmoid' or 'softmax', got {self.scoring_func!r}",
        )
        need(
            self.topk_method in ("noaux_tc", "group_limited_greedy", "greedy"),
            f"topk_method: expected noaux_tc|group_limited_greedy|greedy, got {self.topk_method!r}",
        )
        need(self.num_hidden_layers >= 1, f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        need(self.attention in ("mla", "gqa"), f"attention: expected 'mla' or 'gqa', got {self.attention!r}")
        if self.attention == "gqa":
            need(
                self.num_attention_heads % self.kv_heads == 0,
                f"num_attention_heads={self.num_attention_heads} not divisible by num_key_value_heads={self.kv_heads}",
            )
            need(self.attn_head_dim % 2 == 0, f"head_dim must be even, got {self.attn_head_dim}")
        if self.has_moe:
            need(
                self.n_routed_experts % max(self.n_group, 1) == 0,
                f"n_routed_experts={self.n_routed_experts} not divisible by n_group={self.n_group}",
            )
        if self.has_moe:
            _check_top_k(self)
        try:
            self.routing_spec()  # validates the rest of the routing settings early
        except ValueError as err:  # KernelError: say it in config terms, the caller adds the file
            raise ModelError(f"routing: {err}") from None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attn_head_dim(self) -> int:
        """Query/key width per head: nope + rope dims (MLA) or head_dim (GQA)."""
        if self.attention == "mla":
            return self.qk_head_dim
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.attn_head_dim

    @property
    def shared_width(self) -> int:
        if self.shared_expert_intermediate_size is not None:
            return self.shared_expert_intermediate_size
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def has_moe(self) -> bool:
        return self.n_routed_experts > 0 and self.num_hidden_layers > self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def uses_correction_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    def routing_spec(self) -> RoutingSpec | None:
        if self.n_routed_experts <= 0:
            return None
        grouped = self.topk_method in ("noaux_tc", "group_limited_greedy")
        return RoutingSpec(
            n_experts=self.n_routed_experts,
            top_k=self.num_experts_per_tok,
            score_func=self.scoring_func,
            n_group=self.n_group if grouped else 1,
            topk_group=self.topk_group if grouped else 1,
            group_score="top2_sum" if self.topk_method == "noaux_tc" else "max",
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
        )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- HF config.json ------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Reads an HF config dict: DeepSeek-V2/V3 (hub or transformers-5 field names), Llama,
        Qwen2-MoE or Mixtral (the last three with grouped-query attention)."""
        model_type = raw.get("model_type")
        _refuse_near_misses(raw, source)
        if model_type in GQA_FAMILIES:
            return _gqa_config_from_hf(cls, raw, source)
        if model_type not in ("deepseek_v2", "deepseek_v3"):
            raise ModelError(
                f"{source}: model_type: expected one of {['deepseek_v2', 'deepseek_v3', *GQA_FAMILIES]}, "
                f"got {model_type!r}"
            )
        is_v3 = model_type == "deepseek_v3"

        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        )
        for name in required:
            if raw.get(name) is None:
                near = difflib.get_close_matches(name, [k for k in raw if k not in required], n=1, cutoff=0.8)
                hint = f" (found {near[0]!r}: a typo?)" if near else ""
                raise ModelError(f"{source}: missing required field {name!r}{hint}")

        # Rope: hub checkpoints write `rope_scaling` (+ top-level `rope_theta`);
        # transformers 5 writes `rope_parameters` (with rope_theta and rope_type inside).
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ModelError(f"{source}: rope type: expected 'default' or 'yarn', got {rope_type!r}")
        rope_scaling = None
        if rope_type == "yarn":
            factor = rope.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
                where = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
                raise ModelError(f"{source}: {where}: 'factor': expected a number >= 1, got {factor!r}")
            rope_scaling = {k: v for k, v in rope.items() if k != "type"}
            rope_scaling["rope_type"] = "yarn"
            rope_scaling.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings", 4096))

        if is_v3:
            topk_method = raw.get("topk_method", "noaux_tc")
            scoring = raw.get("scoring_func", "sigmoid")
        else:
            topk_method = raw.get("topk_method", "greedy")
            scoring = raw.get("scoring_func", "softmax")
        n_group = raw.get("n_group") or 1
        topk_group = raw.get("topk_group") or 1

        def eos(value: Any) -> int | None:
            return value[0] if isinstance(value, list) and value else value

        # V2's rotary is always the interleaved (complex) form; V3 says so explicitly.
        rope_interleave = bool(raw.get("rope_interleave", True))
        fields = dict(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            moe_intermediate_size=raw.get("moe_intermediate_size", raw["intermediate_size"]),
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            q_lora_rank=raw.get("q_lora_rank"),
            kv_lora_rank=raw["kv_lora_rank"],
            qk_nope_head_dim=raw["qk_nope_head_dim"],
            qk_rope_head_dim=raw["qk_rope_head_dim"],
            v_head_dim=raw["v_head_dim"],
            attention_bias=bool(raw.get("attention_bias", False)),
            n_routed_experts=raw.get("n_routed_experts") or 0,
            n_shared_experts=raw.get("n_shared_experts") or 0,
            num_experts_per_tok=raw.get("num_experts_per_tok") or 1,
            first_k_dense_replace=raw.get("first_k_dense_replace", 0),
            moe_layer_freq=raw.get("moe_layer_freq", 1),
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=bool(raw.get("norm_topk_prob", is_v3)),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            scoring_func=scoring,
            topk_method=topk_method,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rope_interleave=rope_interleave,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            hidden_act=raw.get("hidden_act", "silu"),
            model_type=model_type,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos(raw.get("eos_token_id")),
        )
        try:
            return cls(**fields)
        except ModelError as err:
            raise ModelError(f"{source}: {err}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        raw = read_document(path, ModelError, missing="config file not found")
        return cls.from_hf_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """HF-style config.json (hub field names, readable by transformers and by us)."""
        if self.model_type in GQA_FAMILIES:
            return _gqa_config_to_hf(self)
        if self.attention != "mla":
            raise ModelError(f"model_type {self.model_type!r} needs attention='mla', got {self.attention!r}")
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"],
            "model_type": self.model_type,
        }
        for f in dataclasses.fields(self):
            if f.name in ("model_type", "rope_scaling", "rope_theta", "bias_update_speed"):
                continue
            out[f.name] = getattr(self, f.name)
        # transformers 5 reads `rope_parameters`; 4.x (and the hub's own configs) read
        # `rope_scaling` with "type" plus a top-level `rope_theta`. Write both, so every reader
        # from 4.57 on applies the same YaRN (5.x prefers `rope_scaling` when both are present).
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        out["rope_parameters"] = rope
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = None
        if self.rope_scaling:
            out["rope_scaling"] = {"type": "yarn", **self.rope_scaling, "rope_type": "yarn"}
        out["num_nextn_predict_layers"] = 0  # MTP layers are not exported
        out["num_key_value_heads"] = self.num_attention_heads
        out["fedmoe_bias_update_speed"] = self.bias_update_speed
        for f in ("attention", "num_key_value_heads", "head_dim", "qkv_bias", "shared_expert_gate"):
            out.pop(f)
        out.pop("shared_expert_intermediate_size")
        return out


# --------------------------------------------------------------------------------------------
# Llama / Qwen2-MoE / Mixtral config.json (grouped-query attention families)
# --------------------------------------------------------------------------------------------

GQA_FAMILIES = ("llama", "qwen2_moe", "mixtral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM"}


def _gqa_rope(raw: dict[str, Any], source: str) -> float:
    """rope_theta; only plain RoPE (rope_type 'default') is supported for these families."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ModelError(f"{source}: rope_parameters: expected an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelError(f"{source}: rope type: expected 'default' for {raw['model_type']}, got {rope_type!r}")
    return float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _gqa_moe_fields(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The MoE fields of a Qwen2-MoE or Mixtral config (softmax scoring, no group limit)."""
    common = dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, moe_layer_freq=1)
    if raw["model_type"] == "mixtral":
        if raw.get("sliding_window") is not None:
            raise ModelError(f"{source}: sliding_window: expected null (full attention), got {raw['sliding_window']!r}")
        return dict(
            common,
            n_routed_experts=raw.get("num_local_experts", 8),
            moe_intermediate_size=raw["intermediate_size"],
            n_shared_experts=0,
            num_experts_per_tok=raw.get("num_experts_per_tok", 2),
            norm_topk_prob=True,
            first_k_dense_replace=0,
        )
    step, dense = raw.get("decoder_sparse_step", 1), list(raw.get("mlp_only_layers") or [])
    if step != 1 or dense != list(range(len(dense))):
        raise ModelError(
            f"{source}: decoder_sparse_step={step}, mlp_only_layers={dense}: expected decoder_sparse_step=1 and "
            "mlp_only_layers = the first k layers (the layouts this model can express)"
        )
    if raw.get("use_sliding_window"):
        raise ModelError(f"{source}: use_sliding_window: expected false, got {raw['use_sliding_window']!r}")
    shared = raw.get("shared_expert_intermediate_size", 0)
    return dict(
        common,
        n_routed_experts=raw.get("num_experts", 60),
        moe_intermediate_size=raw.get("moe_intermediate_size", 1408),
        n_shared_experts=1 if shared else 0,
        shared_expert_intermediate_size=shared,
        shared_expert_gate=bool(shared),
        num_experts_per_tok=raw.get("num_experts_per_tok", 4),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        first_k_dense_replace=len(dense),
        qkv_bias=bool(raw.get("qkv_bias", True)),
    )


def _gqa_config_from_hf(cls: type[ModelConfig], raw: dict[str, Any], source: str) -> ModelConfig:
    model_type = raw["model_type"]
    _require(
        raw, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"), source
    )
    if raw.get("mlp_bias"):
        raise ModelError(f"{source}: mlp_bias: expected false, got {raw['mlp_bias']!r}")
    fields: dict[str, Any] = dict(
        model_type=model_type,
        attention="gqa",
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads"),
        head_dim=raw.get("head_dim"),
        attention_bias=bool(raw.get("attention_bias", False)),
        rope_theta=_gqa_rope(raw, source),
        rope_interleave=False,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        hidden_act=raw.get("hidden_act", "silu"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=_first(raw.get("eos_token_id")),
        n_routed_experts=0,
        n_shared_experts=0,
        first_k_dense_replace=0,
    )
    if model_type != "llama":
        fields.update(_gqa_moe_fields(raw, source))
    try:
        return cls(**fields)
    except (ModelError, TypeError, ValueError) as err:
        raise ModelError(f"{source}: {err}") from None


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def _require(raw: dict[str, Any], required: tuple[str, ...], source: str) -> None:
    for name in required:
        if raw.get(name) is None:
            near = difflib.get_close_matches(name, [k for k in raw if k not in required], n=1, cutoff=0.8)
            hint = f" (found {near[0]!r}: a typo?)" if near else ""
            raise ModelError(f"{source}: missing required field {name!r}{hint}")


def _gqa_family_check(c: ModelConfig) -> None:
    """Refuses a config the family's transformers class could not express (before writing it)."""
    problems = []
    if c.attention != "gqa":
        problems.append(f"attention={c.attention!r} (expected 'gqa')")
    if c.has_moe and (c.scoring_func, c.topk_method, c.routed_scaling_factor) != ("softmax", "greedy", 1.0):
        problems.append("routing must be softmax scoring, topk_method='greedy', routed_scaling_factor=1.0")
    if c.model_type == "llama" and c.n_routed_experts:
        problems.append(f"n_routed_experts={c.n_routed_experts} (Llama is dense)")
    if c.model_type == "qwen2_moe" and (c.attention_bias or not c.shared_width or not c.shared_expert_gate):
        problems.append("Qwen2-MoE needs a gated shared expert and no o_proj bias")
    if c.model_type == "mixtral" and (c.shared_width or c.first_k_dense_replace or not c.norm_topk_prob):
        problems.append("Mixtral has no shared expert, no dense layers and renormalized top-k weights")
    if c.model_type != "qwen2_moe" and c.qkv_bias:
        problems.append("qkv_bias is a Qwen2-MoE field")
    if c.rope_scaling:
        problems.append(f"rope_scaling={c.rope_scaling} (plain RoPE only)")
    if problems:
        raise ModelError(f"config for model_type {c.model_type!r}: " + "; ".join(problems))


def _gqa_config_to_hf(c: ModelConfig) -> dict[str, Any]:
    _gqa_family_check(c)
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[c.model_type]],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.moe_intermediate_size if c.model_type == "mixtral" else c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.attn_head_dim,
        "hidden_act": c.hidden_act,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
    }
    if c.model_type == "llama":
        out.update(attention_bias=c.attention_bias, mlp_bias=False)
    elif c.model_type == "mixtral":
        out.update(num_local_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok, sliding_window=None)
    else:
        out.update(
            num_experts=c.n_routed_experts,
            moe_intermediate_size=c.moe_intermediate_size,
            shared_expert_intermediate_size=c.shared_width,
            num_experts_per_tok=c.num_experts_per_tok,
            norm_topk_prob=c.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(c.first_k_dense_replace)),
            qkv_bias=c.qkv_bias,
            use_sliding_window=False,
        )
    return out


def _check_field_types(c: ModelConfig) -> None:
    """Integer fields hold ints and float fields numbers (a JSON "64" must not reach a tensor shape)."""
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        if f.type in ("int", "int | None") and not (value is None and "None" in f.type):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelError(f"{f.name}: expected an integer, got {value!r}")
        if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ModelError(f"{f.name}: expected a number, got {value!r}")


def _check_top_k(c: ModelConfig) -> None:
    grouped = c.topk_method in ("noaux_tc", "group_limited_greedy")
    n_group = c.n_group if grouped else 1
    if grouped and not 1 <= c.topk_group <= n_group:
        raise ModelError(f"topk_group: expected 1..{n_group} (n_group), got {c.topk_group}")
    eligible = c.n_routed_experts // max(n_group, 1) * (c.topk_group if grouped else 1)
    if not 1 <= c.num_experts_per_tok <= eligible:
        under = f" (experts eligible under n_group={n_group}, topk_group={c.topk_group})" if grouped else ""
        raise ModelError(f"num_experts_per_tok: expected 1..{eligible}{under}, got {c.num_experts_per_tok}")


# config.json fields that change the model and have a default: a misspelling of one would load
# silently with the default (logits off by 2e-3..1.2e-1 in issue 28's trials), so a near miss is refused.
# Required fields have their own message; n_routed_experts is checked against the experts on disk.
_NOT_OPTIONAL = (
    "bias_update_speed",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
)
_OPTIONAL_FIELDS = (
    *(f.name for f in dataclasses.fields(ModelConfig) if f.name not in _NOT_OPTIONAL),
    "rope_parameters",
    "num_experts",
    "num_local_experts",
    "decoder_sparse_step",
    "mlp_only_layers",
    "use_sliding_window",
    "sliding_window",
    "num_nextn_predict_layers",
)
# Other fields HF configs carry, read by nobody here: never taken for a typo.
_OTHER_KNOWN = (
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "pad_token_id",
    "initializer_range",
    "use_cache",
    "attention_dropout",
    "pretraining_tp",
    "mlp_bias",
    "ep_size",
    "num_mtp_layers",
    "aux_loss_alpha",
    "seq_aux",
    "auto_map",
    "layer_types",
    "max_window_layers",
    "router_aux_loss_coef",
    "output_router_logits",
    "router_jitter_noise",
    "quantization_config",
    "fedmoe_bias_update_speed",
    "rope_type",
)


def _refuse_near_misses(raw: dict[str, Any], source: str) -> None:
    known = set(_OPTIONAL_FIELDS) | set(_OTHER_KNOWN) | set(_NOT_OPTIONAL)
    for key in raw:
        if key in known or key.startswith("_"):
            continue
        near = difflib.get_close_matches(key, [k for k in _OPTIONAL_FIELDS if k not in raw], n=1, cutoff=0.8)
        if near:
            raise ModelError(
                f"{source}: unknown field {key!r}: expected {near[0]!r} (a typo?), got {key!r} = {raw[key]!r}; "
                f"{near[0]!r} would silently take its default"
            )


# Presets are data: fedmoe/model/presets.json (ModelConfig keyword arguments; `python -m fedmoe.model.deepseek`
# prints their parameter counts). tiny (~0.26M params, CPU unit tests) is ModelConfig() itself.
PRESETS_FILE = Path(__file__).with_name("presets.json")
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    **{
        name: ModelConfig(**kwargs)
        for name, kwargs in json.loads(PRESETS_FILE.read_text()).items()
        if not name.startswith("_")
    },
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Returns a named preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise ModelError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 so bf16 activations do not lose the small-variance tail.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] for the rotary dims and the cos/sin amplitude factor.

    YaRN (Peng et al., 2023) blends interpolated and extrapolated frequencies with a linear ramp
    between the correction dims of beta_fast/beta_slow rotations, as DeepSeek's checkpoints expect.
    """
    dim = config.rope_dim
    base = config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = config.rope_scaling
    if not rs:
        return inv_freq, 1.0
    factor = float(rs["factor"])
    original_max = rs.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(original_max / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def softmax_scale(config: ModelConfig) -> float:
    scale = config.attn_head_dim**-0.5
    rs = config.rope_scaling
    if rs and rs.get("mscale_all_dim"):
        # DeepSeek folds YaRN's temperature into the softmax scale (mscale^2).
        scale *= yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"])) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = config.rope_interleave

    def forward(self, positions_T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles_TR = positions_T[:, None].float() * self.inv_freq[None, :]  # (T, R/2)
        cos = (angles_TR.cos() * self.attention_factor).to(dtype)
        sin = (angles_TR.sin() * self.attention_factor).to(dtype)
        return cos, sin

    def rotate(self, x: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
        """x: (..., T, R). Interleaved layout pairs (x0,x1),(x2,x3)..; otherwise (x_i, x_{i+R/2}).

        Both layouts return the rotated pairs as [evens' | odds'] halves: attention only uses
        q.k dot products, which are invariant to a shared permutation of the rope dims.
        """
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos_TR - x2 * sin_TR, x2 * cos_TR + x1 * sin_TR], dim=-1)


@dataclass
class LayerKVCache:
    """MLA's compressed cache for one layer: what DeepSeek caches instead of per-head k and v.

    c_kv_BSR: the normalized kv latent (after kv_a_layernorm), [B, S_max, kv_lora_rank];
    k_rope_BSR: the rotated rope key shared by all heads, [B, S_max, qk_rope_head_dim].
    Per token that is kv_lora_rank + rope_dim values, against H * (nope + rope + v) uncompressed.
    """

    c_kv_BSR: torch.Tensor
    k_rope_BSR: torch.Tensor
    absorb: bool = False
    # absorb only: kv_b_proj's effective weight, transposed [R, H * (nope + v)] (adapters
    # included), computed at the first step; generation does not change weights.
    kv_b_RX: torch.Tensor | None = None


@dataclass
class LayerGQACache:
    """Grouped-query attention's cache for one layer: rotated keys and values per KV head,
    [B, H_kv, S_max, head_dim] each (H_kv heads, not H: the point of GQA)."""

    k_BHSX: torch.Tensor
    v_BHSX: torch.Tensor


class KVCache:
    """Per-layer caches (MLA: compressed; GQA: per KV head) plus the number of positions filled.

    Args:
        config: the model's config.
        batch_size: sequences decoded together (equal prompt lengths).
        max_len: capacity in positions (prompt + new tokens); at most max_position_embeddings.
        absorb: attend in the latent space (DeepSeek's "absorb" MLA: kv_b_proj folded into the
            query and the output, nothing decompressed per cached position) instead of
            decompressing every cached latent through kv_b_proj at each step ("naive").
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        absorb: bool = False,
    ) -> None:
        if max_len > config.max_position_embeddings:
            raise ModelError(f"KVCache: max_len {max_len} > max_position_embeddings {config.max_position_embeddings}")
        self.max_len = max_len
        self.length = 0
        self.layers: list[LayerKVCache | LayerGQACache]
        if config.attention == "gqa":
            shape = (batch_size, config.kv_heads, max_len, config.attn_head_dim)
            self.layers = [
                LayerGQACache(
                    torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
                )
                for _ in range(config.num_hidden_layers)
            ]
            return
        self.layers = [
            LayerKVCache(
                torch.zeros(batch_size, max_len, config.kv_lora_rank, dtype=dtype, device=device),
                torch.zeros(batch_size, max_len, config.qk_rope_head_dim, dtype=dtype, device=device),
                absorb=absorb,
            )
            for _ in range(config.num_hidden_layers)
        ]

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers
            for t in vars(layer).values()
            if isinstance(t, torch.Tensor) and t is not getattr(layer, "kv_b_RX", None)
        )


class MultiHeadLatentAttention(nn.Module):
    """MLA (DeepSeek-V2): queries/keys/values decompressed from low-rank latents.

    Computed in the "naive" form (latent -> per-head k, v): training needs the full k/v anyway,
    and every projection stays an nn.Linear, which LoRA and the DP grad samplers can hook. With a
    KV cache, only the compressed latent and the rope key are stored; decode steps then either
    decompress them through kv_b_proj ("naive") or attend in the latent space with kv_b_proj
    absorbed into the query and output ("absorb", `_attend_absorbed`), as the cache says.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        D, H = config.hidden_size, config.num_attention_heads
        bias = config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, config.kv_lora_rank + config.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, H * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * config.v_head_dim, D, bias=bias)
        self.scale = softmax_scale(config)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rotary: RotaryEmbedding,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerKVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """x_BTD holds positions start..start+T; with a cache, positions < start come from it."""
        B, T, _ = x_BTD.shape
        H = self.n_heads
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BHTQ = q.view(B, T, H, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q_BHTQ.split([self.nope_dim, self.rope_dim], dim=-1)

        kv_latent = self.kv_a_proj_with_mqa(x_BTD)
        c_kv_BTR, k_rope_BTR = kv_latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv_BTR = self.kv_a_layernorm(c_kv_BTR)
        q_rope = rotary.rotate(q_rope, cos, sin)
        k_rope_BTR = rotary.rotate(k_rope_BTR.unsqueeze(1), cos, sin).squeeze(1)  # one rope key for all heads
        if cache is not None:  # store this step's latents, attend over everything cached so far
            cache.c_kv_BSR[:, start : start + T] = c_kv_BTR
            cache.k_rope_BSR[:, start : start + T] = k_rope_BTR
            c_kv_BTR, k_rope_BTR = cache.c_kv_BSR[:, : start + T], cache.k_rope_BSR[:, : start + T]
        S = c_kv_BTR.shape[1]  # key positions: start + T with a cache, T without
        if cache is not None and cache.absorb and start > 0:  # decode; a prefill decompresses once, as DeepSeek
            out_BHTV = self._attend_absorbed(q_nope, q_rope, c_kv_BTR, k_rope_BTR, cache)
            return self.o_proj(out_BHTV.transpose(1, 2).reshape(B, T, H * self.v_dim))

        kv = self.kv_b_proj(c_kv_BTR)
        kv_BHSX = kv.view(B, S, H, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v_BHSV = kv_BHSX.split([self.nope_dim, self.v_dim], dim=-1)
        q_BHTQ = torch.cat([q_nope, q_rope], dim=-1)
        k_BHSQ = torch.cat([k_nope, k_rope_BTR.unsqueeze(1).expand(B, H, S, self.rope_dim)], dim=-1)
        out_BHTV = _causal_attention(q_BHTQ, k_BHSQ, v_BHSV, self.scale)
        return self.o_proj(out_BHTV.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _attend_absorbed(
        self,
        q_nope_BHTN: torch.Tensor,
        q_rope_BHTP: torch.Tensor,
        c_kv_BSR: torch.Tensor,
        k_rope_BSP: torch.Tensor,
        cache: LayerKVCache,
    ) -> torch.Tensor:
        """Attention over the compressed cache without decompressing it (DeepSeek-V2, appendix C).

        k_nope = c W_UK^T and v = c W_UV^T, so q_nope . k_nope = (q_nope W_UK) . c and
        sum_s p_s v_s = (sum_s p_s c_s) W_UV^T: scores and values stay in the R-dim latent space.
        N nope dim, P rope dim, V value dim, X = N + V.
        """
        B, H, T, _ = q_nope_BHTN.shape
        S, R = c_kv_BSR.shape[1], self.kv_lora_rank
        if cache.kv_b_RX is None:
            # kv_b_proj applied to the identity = its effective weight^T, LoRA adapters included.
            eye = torch.eye(R, dtype=c_kv_BSR.dtype, device=c_kv_BSR.device)
            assert getattr(self.kv_b_proj, "bias", None) is None, "kv_b_proj has no bias in MLA"
            cache.kv_b_RX = self.kv_b_proj(eye)
        w_HRX = cache.kv_b_RX.view(R, H, self.nope_dim + self.v_dim).transpose(0, 1)
        w_uk_HRN, w_uv_HRV = w_HRX.split([self.nope_dim, self.v_dim], dim=-1)
        q_lat_BHTR = torch.einsum("bhtn,hrn->bhtr", q_nope_BHTN, w_uk_HRN)
        scores_BHTS = torch.einsum("bhtr,bsr->bhts", q_lat_BHTR, c_kv_BSR)
        scores_BHTS = (scores_BHTS + torch.einsum("bhtp,bsp->bhts", q_rope_BHTP, k_rope_BSP)) * self.scale
        if T > 1:  # query t sits at position S - T + t
            mask_TS = torch.ones(T, S, dtype=torch.bool, device=c_kv_BSR.device).tril(diagonal=S - T)
            scores_BHTS = scores_BHTS.masked_fill(~mask_TS, float("-inf"))
        probs_BHTS = torch.softmax(scores_BHTS.float(), dim=-1).to(c_kv_BSR.dtype)
        out_lat_BHTR = torch.einsum("bhts,bsr->bhtr", probs_BHTS, c_kv_BSR)
        return torch.einsum("bhtr,hrv->bhtv", out_lat_BHTR, w_uv_HRV)


def _causal_attention(q_BHTX: torch.Tensor, k_BHSX: torch.Tensor, v_BHSV: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA; with S > T (a cache), query t sits at position S - T + t (bottom-right aligned)."""
    T, S = q_BHTX.shape[2], k_BHSX.shape[2]
    if S == T:
        return F.scaled_dot_product_attention(q_BHTX, k_BHSX, v_BHSV, is_causal=True, scale=scale)
    mask_TS = torch.ones(T, S, dtype=torch.bool, device=q_BHTX.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q_BHTX, k_BHSX, v_BHSV, attn_mask=mask_TS, scale=scale)


class GroupedQueryAttention(nn.Module):
    """GQA (Llama, Qwen2, Mixtral): H query heads share H_kv key/value heads, H / H_kv each.

    Rotate-half RoPE over the whole head_dim (`rope_interleave=False`). Every projection is a plain
    nn.Linear, so LoRA and the DP grad samplers for nn.Linear cover it unchanged.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.kv_heads, config.attn_head_dim
        D, H, X = config.hidden_size, self.n_heads, self.head_dim
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(D, H * X, bias=qkv_bias)
        self.k_proj = nn.Linear(D, self.n_kv * X, bias=qkv_bias)
        self.v_proj = nn.Linear(D, self.n_kv * X, bias=qkv_bias)
        self.o_proj = nn.Linear(H * X, D, bias=config.attention_bias)
        self.scale = softmax_scale(config)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rotary: RotaryEmbedding,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerGQACache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, G, X = self.n_heads, self.n_kv, self.head_dim
        q_BHTX = rotary.rotate(self.q_proj(x_BTD).view(B, T, H, X).transpose(1, 2), cos, sin)
        k_BGTX = rotary.rotate(self.k_proj(x_BTD).view(B, T, G, X).transpose(1, 2), cos, sin)
        v_BGTX = self.v_proj(x_BTD).view(B, T, G, X).transpose(1, 2)
        if cache is not None:
            cache.k_BHSX[:, :, start : start + T] = k_BGTX
            cache.v_BHSX[:, :, start : start + T] = v_BGTX
            k_BGTX, v_BGTX = cache.k_BHSX[:, :, : start + T], cache.v_BHSX[:, :, : start + T]
        # query head h reads KV head h // (H / G), as transformers' repeat_kv
        k_BHSX = k_BGTX.repeat_interleave(H // G, dim=1)
        v_BHSX = v_BGTX.repeat_interleave(H // G, dim=1)
        out_BHTX = _causal_attention(q_BHTX, k_BHSX, v_BHSX, self.scale)
        return self.o_proj(out_BHTX.transpose(1, 2).reshape(B, T, H * X))


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and the shared experts."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinear(nn.Module):
    """A bank of E linear maps stored stacked, weight [E, out, in] (HF / nn.Linear layout).

    forward(x[B, S, in], expert_ids[B, S]) -> [B, S, out]: row (b, s) goes through expert
    expert_ids[b, s]. The batch dimension survives (DP per-sample grads need it); dispatch
    (sort by expert, grouped matmul, unsort) happens inside `fedmoe.kernels.expert_linear`.
    """

    def __init__(self, n_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_BSI: torch.Tensor, expert_ids_BS: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSI.shape
        y_NO = expert_linear(x_BSI.reshape(B * S, -1), expert_ids_BS.reshape(-1), self.weight)
        return y_NO.view(B, S, self.out_features)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, in={self.in_features}, out={self.out_features}"


class RoutedExperts(nn.Module):
    """E SwiGLU experts: fused gate|up bank [E, 2F, D] and down bank [E, D, F]."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = ExpertLinear(n_experts, dim, 2 * hidden)
        self.down_proj = ExpertLinear(n_experts, hidden, dim)

    def forward(self, x_BSD: torch.Tensor, expert_ids_BS: torch.Tensor) -> torch.Tensor:
        h_BSX = self.gate_up_proj(x_BSD, expert_ids_BS)
        gate, up = h_BSX.split(self.hidden, dim=-1)
        return self.down_proj(F.silu(gate) * up, expert_ids_BS)


class Router(nn.Module):
    """Scores each token against every expert and picks top-k (see `fedmoe.kernels.routing`).

    The weight is kept in fp32 and scores are computed in fp32: near-ties decide expert choice,
    and replicas at different banks must agree on it. `e_score_correction_bias` (V3) shifts
    selection only; `expert_load` accumulates how many (token, slot) pairs each expert got
    since the last balancing update.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        spec = config.routing_spec()
        assert spec is not None
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.uses_bias = config.uses_correction_bias
        if self.uses_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))
        self.register_buffer("expert_load", torch.zeros(config.n_routed_experts), persistent=False)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x_BTD.shape
        logits_NE = F.linear(x_BTD.reshape(B * T, D).float(), self.weight.float())
        bias = self.e_score_correction_bias if self.uses_bias else None
        weights_NK, ids_NK, counts_E = route(logits_NE, bias, self.spec)
        if self.training:
            self.expert_load += counts_E.to(self.expert_load.dtype)
        K = self.spec.top_k
        return weights_NK.view(B, T, K), ids_NK.view(B, T, K)

    @torch.no_grad()
    def update_correction_bias(self, gamma: float) -> None:
        """Aux-loss-free balancing step: push each expert's bias toward the mean load."""
        if self.uses_bias and gamma > 0 and self.expert_load.sum() > 0:
            load = self.expert_load
            self.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        self.expert_load.zero_()


class MoE(nn.Module):
    """Shared experts (every token) + routed experts (top-k per token), dropless."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = Router(config)
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = MLP(config.hidden_size, config.shared_width) if config.shared_width else None
        # Qwen2-MoE: sigmoid(x . w) scales the shared expert; an nn.Linear, so DP/LoRA treat it as one
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        K = self.top_k
        weights_BTK, ids_BTK = self.gate(x_BTD)
        # One row per (token, slot): S = T*K rows per sample, batch dimension kept.
        rows_BSD = x_BTD.unsqueeze(2).expand(B, T, K, D).reshape(B, T * K, D)
        y_BSD = self.experts(rows_BSD, ids_BTK.reshape(B, T * K))
        # Combine outside the expert bank: weighted sum over the K slots, as one batched [1, K] @ [K, D]
        # (forward + backward ~1.5x faster on CPU than multiply-then-sum, which builds a [B, T, K, D] temporary).
        w_N1K = weights_BTK.reshape(B * T, 1, K).to(y_BSD.dtype)
        y_BTD = torch.bmm(w_N1K, y_BSD.reshape(B * T, K, D)).view(B, T, D)
        if self.shared_experts is not None:
            shared_BTD = self.shared_experts(x_BTD)
            if self.shared_expert_gate is not None:
                shared_BTD = torch.sigmoid(self.shared_expert_gate(x_BTD)) * shared_BTD
            y_BTD = y_BTD + shared_BTD
        return y_BTD


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn: nn.Module = (
            GroupedQueryAttention(config) if config.attention == "gqa" else MultiHeadLatentAttention(config)
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        )

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryEmbedding,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerKVCache | LayerGQACache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, cos, sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """The causal LM. State-dict keys follow HF's (`model.layers.0.self_attn.kv_b_proj.weight`,
    ...), except expert banks: `mlp.experts.gate_up_proj.weight` [E, 2F, D] (see fedmoe.model.checkpoint).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids_BT: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Returns logits (B, T, V).

        With a `cache`, input_ids_BT are the next T tokens after the cache's `length` positions;
        their compressed latents are appended and `cache.length` advances by T.
        """
        B, T = input_ids_BT.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ModelError(
                f"sequence length {start + T} > max_position_embeddings {self.config.max_position_embeddings}"
            )
        if cache is not None and start + T > cache.max_len:
            raise ModelError(f"KVCache: {start + T} positions needed, capacity {cache.max_len}")
        x = self.model.embed_tokens(input_ids_BT)
        positions_T = torch.arange(start, start + T, device=input_ids_BT.device)
        cos, sin = self.rotary(positions_T, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, self.rotary, cos, sin, cache.layers[i] if cache is not None else None, start)
        if cache is not None:
            cache.length = start + T
        return self.lm_head(self.model.norm(x))

    def new_cache(self, batch_size: int, max_len: int, *, absorb: bool = False) -> KVCache:
        """An empty compressed KV cache in the model's dtype and device (see KVCache)."""
        w = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, dtype=w.dtype, device=w.device, absorb=absorb)

    @torch.no_grad()
    def init_non_persistent_buffers_(self, device: torch.device | str = "cpu") -> None:
        """(Re)creates the buffers no checkpoint holds: rotary frequencies and expert-load counters.

        For a model built on the meta device and filled tensor by tensor (fedmoe.model.checkpoint).
        """
        self.rotary.inv_freq = rope_frequencies(self.config)[0].to(device)
        for router in self.routers():
            router.expert_load = torch.zeros(self.config.n_routed_experts, device=device)

    def routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    @torch.no_grad()
    def update_routing_bias(self, gamma: float | None = None) -> None:
        """Aux-loss-free balancing for every MoE layer; call after each optimizer step."""
        gamma = self.config.bias_update_speed if gamma is None else gamma
        for router in self.routers():
            router.update_correction_bias(gamma)

    def expert_load(self) -> list[torch.Tensor]:
        """Per MoE layer, (token, slot) pairs routed to each expert since the last bias update."""
        return [router.expert_load.clone() for router in self.routers()]

    def num_parameters(self, *, active: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        c = self.config
        inactive_per_layer = (c.n_routed_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
        n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
        return total - n_moe * inactive_per_layer


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy; targets of -100 (padding) are ignored.

    reduction="per_sample" returns the mean loss of each sample (B,), what DP-SGD clips.
    """
    B, T, V = logits_BTV.shape
    if reduction == "per_sample":
        token_loss = F.cross_entropy(logits_BTV.float().reshape(B * T, V), targets_BT.reshape(-1), reduction="none")
        mask = (targets_BT != -100).float()
        return (token_loss.view(B, T) * mask).sum(1) / mask.sum(1).clamp(min=1)
    return F.cross_entropy(logits_BTV.float().reshape(B * T, V), targets_BT.reshape(-1), ignore_index=-100)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, cfg in PRESETS.items():
        if name == "v2-lite-shape":
            with torch.device("meta"):
                m = DeepseekForCausalLM(cfg)
        else:
            m = DeepseekForCausalLM(cfg)
        logger.info(
            "%-14s %8.2fM params, %8.2fM active", name, m.num_parameters() / 1e6, m.num_parameters(active=True) / 1e6
        )
    m = DeepseekForCausalLM(preset("tiny"))
    ids = torch.randint(0, m.config.vocab_size, (2, 16))
    logger.info("tiny logits %s", tuple(m(ids).shape))
