"""The demo's last step on a tiny upcycled base: a job trained over an int8 base, exported from the fp32 base,
its continuations before/after per bank, transformers' reading of the export, and the expert trace."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # a test extra: without it the run fails, never skips the parity tests
from test_upcycle import LLAMA as UPCYCLE_LLAMA  # (tests/model is on sys.path under pytest)

from fedmoe.fl_client.bank import Bank
from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.export import main
from fedmoe.fl_client.task import build_model
from fedmoe.model.checkpoint import load_pretrained
from fedmoe.model.quant import Int8LoRAExpertLinear, Int8LoRALinear
from fedmoe.model.trainable import TrainableView
from fedmoe.model.upcycle import UpcycleSpec, upcycle_folder
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.errors import ConfigError

# test_upcycle's dense Llama, with the byte tokenizer's ids (its 259 ids fit in 300)
LLAMA = {**UPCYCLE_LLAMA, "vocab_size": 300, "bos_token_id": 258, "eos_token_id": 256}


@pytest.fixture
def job(tmp_path) -> JobConfig:
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, 0.2)
    dense.save_pretrained(tmp_path / "dense")
    moe = upcycle_folder(tmp_path / "dense", tmp_path / "moe", UpcycleSpec(n_experts=4, top_k=2, expert_width=48))
    return JobConfig(
        base_checkpoint=str(moe), base_precision="int8", lora_rank=2, seq_len=32, records_per_bank=40,
        bank_state_root=str(tmp_path / "banks"), key_dir=str(tmp_path / "keys"),
    )  # fmt: skip


def trained_banks(job: JobConfig, n: int) -> list[BankConfig]:
    """n banks holding the same replica (one global model), moved away from the start."""
    configs = [BankConfig.from_node_config({"bank-id": f"bank-{i}", "partition-id": i}, job) for i in range(n)]
    flat = torch.randn(TrainableView(build_model(job)).numel, generator=torch.Generator().manual_seed(3)) * 0.3
    for config in configs:
        bank = Bank(job, config)
        bank.view.load_flat_(flat)
        bank.state.applied_round = 2
        bank.save()
    return configs


def test_int8_base_precision_keeps_the_trainable_view_and_is_checked(job):
    int8 = build_model(job)
    fp32 = build_model(JobConfig(**{**job.__dict__, "base_precision": "fp32"}))
    kinds = {type(m) for m in int8.modules()}
    assert Int8LoRALinear in kinds and Int8LoRAExpertLinear in kinds, kinds
    assert not any(type(m).__name__.startswith("Int8") for m in fp32.modules())
    a, b = TrainableView(int8), TrainableView(fp32)
    assert a.layout_hash == b.layout_hash and a.value_hash() == b.value_hash()
    with pytest.raises(ConfigError, match="'base-precision' expected 'fp32' or 'int8', got 'int4'"):
        JobConfig(base_precision="int4")


def test_export_shows_before_after_checks_transformers_and_traces(job, tmp_path, capsys):
    configs = trained_banks(job, 2)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job.to_run_config()), encoding="utf-8")
    out = tmp_path / "final"
    argv = [
        "--job",
        str(job_file),
        "--out",
        str(out),
        "--node-config",
        f"bank-id='bank-0' state-dir='{configs[0].state_root}'",
    ]
    argv += ["--compare-bank", f"bank-id='bank-1' partition-id=1 state-dir='{configs[1].state_root}'"]
    argv += ["--prompt", "Card payment of", "--prompt", "IBAN", "--max-new-tokens", "8"]
    assert main([*argv, "--check-transformers", "--trace-held-out", "3"]) == 0, capsys.readouterr()
    text = capsys.readouterr().out
    assert "bank-1: replica after round 2" in text and "(= bank-0's replica, bit for bit)" in text, text
    assert text.count("before (every bank)") == 2 and text.count("after  bank-1") == 2, text
    assert "  after  bank-1      : 'IBAN" in text, text
    assert f"transformers reads {out / 'merged'} as Qwen2MoeForCausalLM" in text, text
    assert text.count("(the same 8 tokens as ours)") == 2, text
    summaries = [json.loads((out / f"expert_summary_{w}.json").read_text()) for w in ("before", "after")]
    assert summaries[0]["tokens"] == summaries[1]["tokens"] > 0
    assert summaries[0]["layers"] != summaries[1]["layers"], "the trained routed experts moved no token"
    assert (out / "expert_trace.png").read_bytes()[:4] == b"\x89PNG"
    # exported from the fp32 base: the merged folder is the fp32 model with the replica, not the int8 copy
    fp32 = build_model(JobConfig(**{**job.__dict__, "base_precision": "fp32"}))
    TrainableView(fp32).load_flat_(Bank(job, configs[0]).view.flatten())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (load_pretrained(out / "merged").eval()(ids) - fp32.eval()(ids)).abs().max()
    assert diff < 1e-5, diff
