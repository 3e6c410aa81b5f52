"""Our logits vs transformers' DeepSeek-V2/V3 implementation on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers  # a test extra: without it the run fails, never skips the parity tests

from fedmoe.model.checkpoint import load_pretrained, save_pretrained

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    max_position_embeddings=256,
)
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
    "rope_theta": 10000.0,
}


def _randomize(hf_model: torch.nn.Module, seed: int) -> None:
    """HF inits router weights/biases to tiny or zero values; make routing non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(hf_model.named_parameters()) + list(hf_model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1 + (1.0 if "norm" in name else 0.0))


def _hf_logits(hf_model, ids):
    hf_model.eval()
    with torch.no_grad():
        return hf_model(input_ids=ids).logits


@pytest.mark.parametrize("q_lora_rank", [None, 32])
@pytest.mark.parametrize("interleave", [True, False])
def test_v3_logits_match_transformers(tmp_path, q_lora_rank, interleave):
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        **TINY,
        q_lora_rank=q_lora_rank,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        rope_interleave=interleave,
        rope_parameters=YARN,
        num_mtp_layers=0,
    )
    hf_model = transformers.DeepseekV3ForCausalLM(config)
    _randomize(hf_model, seed=1)
    hf_model.save_pretrained(tmp_path / "hf")

    ours = load_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))
    expected = _hf_logits(hf_model, ids)
    with torch.no_grad():
        got = ours(ids)
    assert (got - expected).abs().max().item() < 1e-4

    # Our own saver (per-expert keys, like the hub) round-trips to the same logits,
    # and transformers can read what we wrote.
    save_pretrained(ours, tmp_path / "ours", layout="per_expert")
    again = load_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (again(ids) - expected).abs().max().item() < 1e-4
    hf_again = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours")
    assert (_hf_logits(hf_again, ids) - expected).abs().max().item() < 1e-4


def test_v2_softmax_logits_match_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.DeepseekV2Config(
        **TINY,
        q_lora_rank=None,
        n_group=4,
        topk_group=2,
        topk_method="group_limited_greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    hf_model = transformers.DeepseekV2ForCausalLM(config)
    _randomize(hf_model, seed=3)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf").eval()
    assert ours.config.scoring_func == "softmax"
    ids = torch.randint(0, TINY["vocab_size"], (2, 33), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = ours(ids)
    assert (got - _hf_logits(hf_model, ids)).abs().max().item() < 1e-4
