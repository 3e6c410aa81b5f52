"""Routing bias semantics, load balancing, LoRA, trainable view, config and checkpoint errors."""

from __future__ import annotations

import json

import pytest
import torch

from fedmoe.kernels import RoutingSpec, route
from fedmoe.model.checkpoint import load_pretrained, save_pretrained
from fedmoe.model.deepseek import DeepseekForCausalLM, ModelConfig, lm_loss, preset
from fedmoe.model.errors import CheckpointError, ModelError
from fedmoe.model.lora import LoraConfig, configure_trainable
from fedmoe.model.tokenizer import ByteTokenizer, load_tokenizer
from fedmoe.model.trainable import TrainableView


def tiny_model(seed: int = 0, **overrides) -> DeepseekForCausalLM:
    torch.manual_seed(seed)
    return DeepseekForCausalLM(preset("tiny", **overrides))


def test_tiny_preset_is_under_one_million_params():
    assert tiny_model().num_parameters() < 1_000_000


def test_correction_bias_changes_choice_not_weights():
    spec = RoutingSpec(n_experts=8, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    w0, ids0, _ = route(logits, torch.zeros(8), spec)
    bias = torch.zeros(8)
    popular = int(torch.bincount(ids0.reshape(-1), minlength=8).argmax())
    bias[popular] = -1.0  # make the most chosen expert unattractive for selection
    w1, ids1, _ = route(logits, bias, spec)
    assert (ids0 == popular).any() and not (ids1 == popular).any()
    # Combine weights are the *unbiased* scores of whatever was chosen, renormalized and scaled.
    scores = logits.sigmoid()
    expected = scores.gather(1, ids1)
    expected = expected / expected.sum(1, keepdim=True) * 2.5
    torch.testing.assert_close(w1, expected)
    # Same choice -> identical weights whatever the bias.
    w2, ids2, _ = route(logits, torch.full((8,), 0.3), spec)
    assert torch.equal(ids2, ids0)
    torch.testing.assert_close(w2, w0)


def test_bias_update_moves_load_toward_uniform():
    model = tiny_model(1, bias_update_speed=0.01).train()
    router = model.routers()[0]
    with torch.no_grad():  # skew the router hard toward expert 0
        router.weight[0] += 0.5
    x = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))

    def imbalance() -> float:
        with torch.no_grad():
            model(x)
        load = model.expert_load()[0]
        model.update_routing_bias()
        return (load.max() / load.mean()).item()

    first = imbalance()
    for _ in range(60):
        last = imbalance()
    assert first > 2.0
    assert last < 0.6 * first
    assert router.e_score_correction_bias[0] < 0


def test_lora_zero_b_leaves_logits_unchanged_and_trains_only_b():
    model = tiny_model(2).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(ids)
    configure_trainable(model, "lora", LoraConfig(rank=4, seed=7))
    with torch.no_grad():
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    names = list(TrainableView(model).params)
    assert names and all(n.endswith("lora_B.weight") for n in names)
    assert any("experts.gate_up_proj.lora_B" in n for n in names)
    # Same job seed + same base -> identical frozen A at every bank.
    other = configure_trainable(tiny_model(2), "lora", LoraConfig(rank=4, seed=7))
    a1 = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    a2 = {n: p for n, p in other.named_parameters() if "lora_A" in n}
    assert a1.keys() == a2.keys() and all(torch.equal(a1[n], a2[n]) for n in a1)
    # A gradient step on B changes the logits (the adapters are wired in).
    loss = lm_loss(model.train()(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    with torch.no_grad():
        for p in TrainableView(model).params.values():
            p -= 1.0 * p.grad
        assert (model.eval()(ids) - before).abs().max() > 1e-4


def test_train_modes_select_the_right_tensors():
    router_experts = configure_trainable(tiny_model(), "router+experts")
    names = list(TrainableView(router_experts).params)
    assert names and all(".mlp.gate." in n or ".mlp.experts." in n for n in names)
    full = configure_trainable(tiny_model(), "full")
    assert TrainableView(full).numel == full.num_parameters()
    with pytest.raises(ModelError, match="train mode"):
        configure_trainable(tiny_model(), "everything")


def test_trainable_view_roundtrip_is_exact():
    model = configure_trainable(tiny_model(3), "router+experts")
    view = TrainableView(model)
    flat = view.flatten()
    assert flat.dtype == torch.float32 and flat.numel() == view.numel
    named = view.unflatten(flat)
    assert list(named) == list(view.params)
    for name, p in view.params.items():
        assert torch.equal(named[name], p.detach())
    perturbed = flat + torch.randn_like(flat)
    view.load_flat_(perturbed)
    assert torch.equal(view.flatten(), perturbed)
    # Layout hash depends on names/shapes only.
    assert view.layout_hash == TrainableView(configure_trainable(tiny_model(9), "router+experts")).layout_hash
    with pytest.raises(ModelError, match="expected"):
        view.unflatten(flat[:-1])


def test_config_reads_hub_rope_scaling_and_errors_name_the_field(tmp_path):
    raw = preset("tiny").to_hf_dict()
    raw.pop("rope_parameters")
    raw["rope_theta"] = 5000.0
    raw["rope_scaling"] = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128, "mscale": 0.7}
    cfg = ModelConfig.from_hf_dict(raw)
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling["rope_type"] == "yarn"
    bad = dict(raw, model_type="gpt2")
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match=r"config\.json: model_type"):
        ModelConfig.from_json_file(tmp_path / "config.json")


def test_checkpoint_errors_name_key_and_shapes(tmp_path):
    model = tiny_model(4)
    save_pretrained(model, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["moe_intermediate_size"] = 40
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"shape mismatch for model\.layers\.1\.mlp\..*checkpoint \(.*model expects"
    ):
        load_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "nope")


def test_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    save_pretrained(tiny_model(5), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(path))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"missing key model\.norm\.weight"):
        load_pretrained(tmp_path / "ckpt")
    tensors["model.norm.weight"] = torch.ones(64)
    tensors["model.extra.weight"] = torch.ones(3)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected key model\.extra\.weight"):
        load_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_sharded_bf16_roundtrip(tmp_path, layout):
    model = tiny_model(6).eval()
    save_pretrained(model, tmp_path / "ckpt", layout=layout, dtype=torch.bfloat16, max_shard_bytes=60_000)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    loaded = load_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.routers()[0].weight.dtype == torch.float32  # router stays fp32
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(b.float(), a.to(b.dtype).float(), msg=name)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert (loaded.float()(ids) - model(ids)).abs().max() < 0.05


def test_byte_tokenizer_roundtrip_and_default():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer)
    text = "Überweisung 12,50 € an Café"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256 < preset("small").vocab_size


def test_hf_tokenizer_json_is_used(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, "pay": 2, "ment": 3, "card": 4}
    hf = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, eos_id=1)
    assert tok.encode("card pay") == [4, 2]
    assert tok.eos_id == 1 and tok.vocab_size == 5
