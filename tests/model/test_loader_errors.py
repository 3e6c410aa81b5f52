"""Every bad checkpoint raises CheckpointError naming the file, key or config field, expected vs got."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmoe.model.checkpoint import load_pretrained, save_pretrained
from fedmoe.model.deepseek import DeepseekForCausalLM, preset
from fedmoe.model.errors import CheckpointError

EXPERT = "model.layers.1.mlp.experts.3"


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A valid tiny V3 checkpoint (2 layers: dense + MoE with 8 experts, noaux_tc)."""
    torch.manual_seed(0)
    save_pretrained(DeepseekForCausalLM(preset("tiny")), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_tensors(ckpt: Path, fn) -> None:
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def edit_config(ckpt: Path, fn) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    fn(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_the_fixture_loads(ckpt):
    assert load_pretrained(ckpt).config.num_hidden_layers == 2


def test_expert_gate_proj_one_row_short(ckpt):
    edit_tensors(ckpt, lambda t: t.update({f"{EXPERT}.gate_proj.weight": t[f"{EXPERT}.gate_proj.weight"][:-1]}))
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors: shape mismatch for {EXPERT}\.gate_proj\.weight: checkpoint \(31, 64\), "
        r"model expects \(32, 64\) \(config\.json moe_intermediate_size=32",
    ):
        load_pretrained(ckpt)


def test_expert_down_proj_transposed(ckpt):
    key = f"{EXPERT}.down_proj.weight"
    edit_tensors(ckpt, lambda t: t.update({key: t[key].T.contiguous()}))
    with pytest.raises(
        CheckpointError,
        match=rf"{EXPERT}\.down_proj\.weight: checkpoint \(32, 64\), model expects \(64, 32\) \(transposed",
    ):
        load_pretrained(ckpt)


def test_config_typo_in_kv_lora_rank(ckpt):
    edit_config(ckpt, lambda c: c.update(kv_lora_rnak=c.pop("kv_lora_rank")))
    with pytest.raises(
        CheckpointError, match=r"config\.json: missing required field 'kv_lora_rank' \(found 'kv_lora_rnak'"
    ):
        load_pretrained(ckpt)


def test_config_typo_in_num_hidden_layers(ckpt):
    edit_config(ckpt, lambda c: c.update(num_hidden_layer=c.pop("num_hidden_layers")))
    with pytest.raises(CheckpointError, match=r"config\.json: missing required field 'num_hidden_layers'"):
        load_pretrained(ckpt)


@pytest.mark.parametrize("edit", ["renamed", "wrong_value"])
def test_config_typo_in_n_routed_experts_names_the_field(ckpt, edit):
    if edit == "renamed":  # the field is then absent: a dense-only config
        edit_config(ckpt, lambda c: c.update(n_routed_expert=c.pop("n_routed_experts")))
        got = 0
    else:
        edit_config(ckpt, lambda c: c.update(n_routed_experts=16))
        got = 16
    with pytest.raises(
        CheckpointError,
        match=rf"config\.json: n_routed_experts={got}, but model\.safetensors has 8 routed experts \(0\.\.7\) "
        r"under model\.layers\.1\.mlp\.experts: expected n_routed_experts=8",
    ):
        load_pretrained(ckpt)


def test_missing_expert_names_the_key(ckpt):
    edit_tensors(ckpt, lambda t: t.pop(f"{EXPERT}.up_proj.weight"))
    with pytest.raises(CheckpointError, match=rf"missing key {EXPERT}\.up_proj\.weight"):
        load_pretrained(ckpt)


def test_missing_correction_bias_under_noaux_tc(ckpt):
    edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.gate.e_score_correction_bias"))
    with pytest.raises(
        CheckpointError,
        match=r"missing key model\.layers\.1\.mlp\.gate\.e_score_correction_bias: "
        r"config\.json has topk_method='noaux_tc'",
    ):
        load_pretrained(ckpt)


def test_num_hidden_layers_one_too_small_is_not_taken_for_mtp(ckpt):
    edit_config(ckpt, lambda c: c.update(num_hidden_layers=1))
    with pytest.raises(
        CheckpointError,
        match=r"config\.json: num_hidden_layers=1 \(\+ num_nextn_predict_layers=0 MTP\) covers layers 0\.\.0, "
        r"but model\.safetensors has layer 1 .*expected num_hidden_layers=2",
    ):
        load_pretrained(ckpt)
    # With one MTP layer declared, layer 1 would have to be an MTP layer: it has no eh_proj.
    edit_config(ckpt, lambda c: c.update(num_nextn_predict_layers=1))
    with pytest.raises(
        CheckpointError, match=r"layer 1 should be an MTP layer .* no eh_proj .*expected num_hidden_layers=2"
    ):
        load_pretrained(ckpt)


def test_num_hidden_layers_one_too_large(ckpt):
    edit_config(ckpt, lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(
        CheckpointError,
        match=r"num_hidden_layers=3, but the checkpoint has no tensors for layer 2 .*expected num_hidden_layers=2",
    ):
        load_pretrained(ckpt)


def test_mtp_layer_declared_in_config_is_skipped(ckpt):
    reference = load_pretrained(ckpt).eval()

    def add_mtp(t):
        for key in list(t):
            if key.startswith("model.layers.1."):
                t[key.replace("model.layers.1.", "model.layers.2.")] = t[key].clone()
        t["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
        t["model.layers.2.enorm.weight"] = torch.ones(64)

    edit_tensors(ckpt, add_mtp)
    with pytest.raises(CheckpointError, match="num_hidden_layers=2"):
        load_pretrained(ckpt)  # MTP layer present but not declared
    edit_config(ckpt, lambda c: c.update(num_nextn_predict_layers=1))
    loaded = load_pretrained(ckpt).eval()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), reference(ids))


def test_fp8_weights_without_scales_are_refused_by_dtype(ckpt):
    edit_tensors(
        ckpt,
        lambda t: t.update(
            {"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)}
        ),
    )
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: model\.layers\.0\.mlp\.up_proj\.weight: dtype F8_E4M3 is a quantized format",
    ):
        load_pretrained(ckpt)


def test_scale_tensors_are_refused(ckpt):
    edit_tensors(ckpt, lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(1, 1)}))
    with pytest.raises(CheckpointError, match=r"up_proj\.weight_scale_inv: quantization scale tensor"):
        load_pretrained(ckpt)


def test_quantized_config_is_refused_before_any_shard_is_read(ckpt):
    edit_config(ckpt, lambda c: c.update(quantization_config={"quant_method": "fp8", "fmt": "e4m3"}))
    # Make every shard unreadable: if the loader opened one, the error would be about the shard.
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match=r"config\.json: quantization_config: .* quant_method='fp8' fmt='e4m3'"):
        load_pretrained(ckpt)


def test_corrupt_shard_names_the_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        load_pretrained(ckpt)


def test_bf16_load_keeps_values_and_router_in_fp32(ckpt, tmp_path):
    model = load_pretrained(ckpt)
    save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = load_pretrained(tmp_path / "bf16", dtype="auto")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.routers()[0].weight.dtype == torch.float32
    assert loaded.rotary.inv_freq.dtype == torch.float32 and not loaded.rotary.inv_freq.is_meta
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(b.float(), a.to(b.dtype).float()), name


def test_tied_embeddings_stay_tied(tmp_path):
    torch.manual_seed(1)
    model = DeepseekForCausalLM(preset("tiny", tie_word_embeddings=True))
    save_pretrained(model, tmp_path / "tied")
    loaded = load_pretrained(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


# ---------------------------------------------------------------------------------------------
# Broken checkpoints as a user would make them (issue 28): each a CheckpointError naming the
# file, the key or field, expected and got (before: AttributeError, KeyError, TypeError,
# KernelError without a file, the wrong field blamed, or silent defaults).
# ---------------------------------------------------------------------------------------------


def test_index_with_a_list_for_weight_map(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": []}))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors\.index\.json: weight_map: expected an object .*, got list"
    ):
        load_pretrained(ckpt)


def test_yarn_rope_without_factor(ckpt):
    edit_config(ckpt, lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0}))
    with pytest.raises(
        CheckpointError, match=r"config\.json: rope_parameters: 'factor': expected a number >= 1, got None"
    ):
        load_pretrained(ckpt)


def test_hidden_size_as_a_string(ckpt):
    edit_config(ckpt, lambda c: c.update(hidden_size="64"))
    with pytest.raises(CheckpointError, match=r"config\.json: hidden_size: expected an integer, got '64'"):
        load_pretrained(ckpt)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (
            "num_experts_per_tok",
            r"num_experts_per_tok: expected 1\.\.4 \(experts eligible under n_group=4, topk_group=2\)",
        ),
        ("topk_group", r"topk_group: expected 1\.\.4 \(n_group\), got 99"),
    ],
)
def test_top_k_out_of_range_names_the_file_and_field(ckpt, field, message):
    edit_config(ckpt, lambda c: c.update({field: 99}))
    with pytest.raises(CheckpointError, match=r"config\.json: " + message):
        load_pretrained(ckpt)


def test_index_missing_one_shard_names_the_shard_not_num_hidden_layers(ckpt, tmp_path):
    torch.manual_seed(0)
    save_pretrained(DeepseekForCausalLM(preset("tiny")), tmp_path / "sharded", max_shard_bytes=200_000)
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shards[-1]}
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors\.index\.json: weight_map: expected every shard in the folder, got no key for "
        rf"{shards[-1]}",
    ):
        load_pretrained(tmp_path / "sharded")


@pytest.mark.parametrize(
    ("right", "typo", "value"),
    [
        ("num_experts_per_tok", "num_expert_per_tok", 3),
        ("rope_scaling", "rope_scailng", {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}),
        ("routed_scaling_factor", "routed_scalling_factor", 2.5),
        ("topk_group", "top_k_group", 1),
    ],
)
def test_misspelled_optional_fields_are_refused_not_defaulted(ckpt, right, typo, value):
    def edit(c):
        c.pop(right, None)
        if right == "rope_scaling":
            c.pop("rope_parameters")
        c[typo] = value

    edit_config(ckpt, edit)
    with pytest.raises(
        CheckpointError, match=rf"config\.json: unknown field '{typo}': expected '{right}' \(a typo\?\), got"
    ):
        load_pretrained(ckpt)


def test_truncated_shard_says_where_the_file_ends(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: .*: data ends at byte \d+, but the file has \d+ bytes \(truncated\?\)",
    ):
        load_pretrained(ckpt)
