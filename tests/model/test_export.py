"""Export of a LoRA-trained model: merged HF folder, PEFT adapter, save_pretrained's refusal."""

from __future__ import annotations

import json

import pytest
import torch

from fedmoe.model.checkpoint import load_pretrained, save_pretrained
from fedmoe.model.deepseek import DeepseekForCausalLM, lm_loss, preset
from fedmoe.model.errors import CheckpointError
from fedmoe.model.export import (
    EXPERT_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    export_adapter,
    export_base,
    export_job,
    export_merged,
    load_model,
    load_trainable,
)
from fedmoe.model.lora import LoraConfig, configure_trainable, lora_modules, merge_and_unload
from fedmoe.model.trainable import TrainableView

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}
IDS = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(11))


def base_model(seed: int = 0) -> DeepseekForCausalLM:
    """Tiny V3 with YaRN, routed scaling and a non-zero correction bias (all of it must survive)."""
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(
        preset("tiny", rope_scaling=YARN, max_position_embeddings=256, routed_scaling_factor=2.5)
    )
    with torch.no_grad():
        for router in model.routers():
            router.e_score_correction_bias.copy_(torch.randn(router.e_score_correction_bias.shape) * 0.05)
    return model.eval()


def lora_trained(model: DeepseekForCausalLM, targets: tuple[str, ...]) -> DeepseekForCausalLM:
    """A few real SGD steps on B (A frozen, FFA-LoRA), so the adapters move the logits."""
    configure_trainable(model, "lora", LoraConfig(rank=4, alpha=8.0, targets=targets, seed=3))
    params = list(TrainableView(model).params.values())
    opt = torch.optim.SGD(params, lr=0.5)
    data = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(5))
    model.train()
    for _ in range(5):
        opt.zero_grad()
        lm_loss(model(data[:, :-1]), data[:, 1:]).backward()
        opt.step()
    return model.eval()


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids) if not isinstance(model, DeepseekForCausalLM) else model(ids)
    return getattr(out, "logits", out)


ALL = ("q_proj", "q_b_proj", "kv_b_proj", "o_proj", "experts", "shared_experts", "mlp")


def test_merged_export_gives_adapted_logits_in_transformers(tmp_path):
    import transformers  # a test extra: missing, the test fails

    base = base_model()
    base_logits = logits(base)
    model = lora_trained(base, ALL)
    adapted = logits(model)
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapters matter

    export_merged(model, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(hf) - adapted).abs().max().item() < 1e-4
    ours = load_pretrained(tmp_path / "merged").eval()
    assert (logits(ours) - adapted).abs().max().item() < 1e-4
    assert not lora_modules(ours)


def test_exported_config_has_the_fields_a_4x_reader_needs(tmp_path):
    import transformers  # a test extra: missing, the test fails

    model = lora_trained(base_model(1), ("q_b_proj", "experts"))
    adapted = logits(model)
    export_merged(model, tmp_path / "merged")
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    # The hub's (and transformers 4.x's) fields: rope_scaling with "type", top-level rope_theta.
    assert cfg["rope_theta"] == 10000.0
    rs = cfg["rope_scaling"]
    assert rs["type"] == "yarn" and rs["rope_type"] == "yarn"
    for key in ("factor", "original_max_position_embeddings", "mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
        assert rs[key] == YARN[key], key
    assert "rope_theta" not in rs
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["num_nextn_predict_layers"] == 0
    # A reader that knows only the hub fields (no rope_parameters) gets the same logits.
    del cfg["rope_parameters"]
    (tmp_path / "merged" / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(hf) - adapted).abs().max().item() < 1e-4
    # ...and YaRN is really in effect: dropping rope_scaling changes the logits.
    cfg["rope_scaling"] = None
    (tmp_path / "merged" / "config.json").write_text(json.dumps(cfg))
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(plain) - adapted).abs().max().item() > 1e-3


def test_peft_loads_the_attention_adapter(tmp_path):
    import peft  # a test extra: missing, the test fails
    import transformers  # a test extra: missing, the test fails

    base = base_model(2)
    export_base(base, tmp_path / "base")
    model = lora_trained(base, ("q_b_proj", "kv_b_proj", "o_proj"))
    export_adapter(model, tmp_path / "adapter", base_model_name_or_path=tmp_path / "base", seed=3)
    cfg = json.loads((tmp_path / "adapter" / PEFT_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert not (tmp_path / "adapter" / EXPERT_WEIGHTS).exists()

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    hf_base_logits = logits(hf)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    adapted = logits(model)
    assert (logits(peft_model) - adapted).abs().max().item() < 1e-4
    assert (hf_base_logits - adapted).abs().max().item() > 1e-2


def test_adapter_with_expert_banks_reloads_exactly(tmp_path):
    base = base_model(3)
    export_base(base, tmp_path / "base")
    model = lora_trained(base, ALL)
    adapted = logits(model)
    written = export_adapter(model, tmp_path / "adapter")
    assert (written / PEFT_WEIGHTS).exists() and (written / EXPERT_WEIGHTS).exists()
    again = load_model(tmp_path / "base", adapter_dir=tmp_path / "adapter")
    assert set(lora_modules(again)) == set(lora_modules(model))
    assert (logits(again) - adapted).abs().max().item() < 1e-5
    # Without the companion file the adapter is incomplete, and loading says so.
    (written / EXPERT_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=r"adapter tensors do not match: missing .*(experts|mlp)"):
        load_model(tmp_path / "base", adapter_dir=tmp_path / "adapter")


def test_save_pretrained_on_lora_model_refuses_or_merges(tmp_path):
    base = base_model(4)
    base_logits = logits(base)
    model = lora_trained(base, ALL)
    adapted = logits(model)
    with pytest.raises(CheckpointError, match="LoRA adapters on .* merge_lora=True"):
        save_pretrained(model, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    save_pretrained(model, tmp_path / "merged", merge_lora=True, dtype=torch.float32)
    reloaded = logits(load_pretrained(tmp_path / "merged"))
    assert (reloaded - adapted).abs().max().item() < 1e-5
    assert (reloaded - base_logits).abs().max().item() > 1e-2  # not the base weights
    assert lora_modules(model)  # the model itself keeps its adapters


def test_merge_and_unload_keeps_the_adapted_forward():
    model = lora_trained(base_model(5), ALL)
    adapted = logits(model)
    merge_and_unload(model)
    assert not lora_modules(model) and not any(".lora_" in n for n, _ in model.named_parameters())
    assert (logits(model) - adapted).abs().max().item() < 1e-5


def test_export_job_from_a_replica_file_of_trainable_tensors(tmp_path):
    """A bank's replica holds only B; rebuilding with the job's seed re-derives A exactly."""
    from safetensors.torch import save_file

    trained = lora_trained(base_model(6), ALL)
    adapted = logits(trained)
    view = TrainableView(trained)
    save_file({n: p.detach().contiguous() for n, p in view.params.items()}, str(tmp_path / "replica.safetensors"))

    fresh = configure_trainable(base_model(6), "lora", LoraConfig(rank=4, alpha=8.0, targets=ALL, seed=3))
    load_trainable(fresh, tmp_path / "replica.safetensors")
    written = export_job(fresh, tmp_path / "final", seed=3)
    assert set(written) == {"merged", "adapter", "base"}
    assert (logits(load_model(written["merged"])) - adapted).abs().max().item() < 1e-5
    again = load_model(written["base"], adapter_dir=written["adapter"])
    assert (logits(again) - adapted).abs().max().item() < 1e-5


def test_ffn_adapters_of_an_moe_stay_out_of_peft_and_reload_exactly(tmp_path):
    # PEFT 0.21 + transformers 5 maps targets named *.gate_proj/up_proj/down_proj of an MoE onto the
    # fused routed experts and drops them (the adapted logits silently became the base's); the
    # export keeps those adapters in the companion file, where load_adapter applies them.
    import peft  # a test extra: missing, the test fails
    import transformers  # a test extra: missing, the test fails

    base = base_model(2)
    export_base(base, tmp_path / "base")
    model = lora_trained(base_model(2), ("o_proj", "shared_experts", "mlp"))
    adapted = logits(model)
    export_adapter(model, tmp_path / "adapter", base_model_name_or_path=tmp_path / "base")
    cfg = json.loads((tmp_path / "adapter" / PEFT_CONFIG).read_text())
    assert all(name.endswith("o_proj") for name in cfg["target_modules"])
    meta = json.loads((tmp_path / "adapter" / "fedmoe_lora.json").read_text())
    assert meta["linear_modules_outside_peft"] and all(
        n.split(".")[-2] in ("mlp", "shared_experts") for n in meta["linear_modules_outside_peft"]
    )
    ours = load_model(tmp_path / "base", adapter_dir=tmp_path / "adapter")
    assert torch.equal(logits(ours), adapted)
    # what PEFT applies is exactly the attention part
    attention_only = load_model(tmp_path / "base")
    configure_trainable(attention_only, "lora", LoraConfig(rank=4, alpha=8.0, targets=("o_proj",)))
    peft_part = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in attention_only.named_parameters():
            if ".lora_" in name:
                p.copy_(peft_part[name])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert (logits(peft_model) - logits(attention_only)).abs().max().item() < 1e-4
