"""Grouped-query attention families (Llama, Qwen2-MoE, Mixtral) against transformers on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers  # a test extra: without it the run fails, never skips the parity tests

from fedmoe.model.checkpoint import load_pretrained, save_pretrained
from fedmoe.model.deepseek import DeepseekForCausalLM

BASE = dict(
    vocab_size=300,
    hidden_size=72,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=False)),
    "llama-bias-tied": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, tie_word_embeddings=True)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=8, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts_per_tok=3),
    ),
    "qwen2_moe-norm-dense0": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=6,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            qkv_bias=False,
        ),
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=5, num_experts_per_tok=2)),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """HF inits routers to zero and norms to one; random values make every path count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1 + (1.0 if "norm" in name else 0.0))


def hf_model(family: str, seed: int = 1) -> torch.nn.Module:
    cfg_name, cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cfg_name)(**BASE, **extra)
    config._experts_implementation = "eager"  # the loop over experts (grouped_mm has no float64)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config)
    randomize(model, seed)
    return model.eval()


def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_and_round_trip(tmp_path, family):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf").eval()
    assert ours.config.attention == "gqa" and ours.config.model_type == family.split("-")[0]
    ids = torch.randint(0, BASE["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(2))
    expected = hf_logits(hf, ids)
    with torch.no_grad():
        got = ours(ids)
    assert (got - expected).abs().max().item() < 1e-4

    # our writer: transformers reads it (the family's own class) with the same logits
    save_pretrained(ours, tmp_path / "ours")
    back = getattr(transformers, FAMILIES[family][1]).from_pretrained(tmp_path / "ours").eval()
    assert (hf_logits(back, ids) - expected).abs().max().item() < 1e-4
    again = load_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(ids), got)


# Routers score in fp32 by design (fedmoe.model.deepseek.Router): the MoE family matches to fp32
# router precision; attention, norms and the dense path match to fp64 rounding.
@pytest.mark.parametrize(("family", "tolerance"), [("llama", 1e-10), ("qwen2_moe", 1e-6)])
def test_float64_logits_match(tmp_path, family, tolerance):
    hf = hf_model(family).double()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        err = (ours(ids) - hf_logits(hf, ids)).abs().max().item()
    assert err < tolerance


@pytest.mark.parametrize("family", ["llama-bias-tied", "qwen2_moe"])
def test_cached_decode_equals_full_forward(tmp_path, family):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    ours: DeepseekForCausalLM = load_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(4))
    cache = ours.new_cache(2, 20)
    with torch.no_grad():
        full = ours(ids)
        steps = [ours(ids[:, :12], cache)] + [ours(ids[:, t : t + 1], cache) for t in range(12, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5
    assert cache.nbytes() == 2 * 3 * 2 * 2 * 20 * 12 * 4  # k and v, 3 layers, B=2, 2 KV heads, 20 positions, fp32
