"""Generation with MLA's compressed KV cache vs without; expert trace vs the model's own counts;
perplexity vs a direct loss; the `python -m fedmoe.model` commands end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedmoe.model.__main__ import main
from fedmoe.model.checkpoint import save_pretrained
from fedmoe.model.deepseek import DeepseekForCausalLM, lm_loss, preset
from fedmoe.model.evaluate import load_texts, perplexity, token_windows
from fedmoe.model.generate import SamplingConfig, generate
from fedmoe.model.tokenizer import ByteTokenizer
from fedmoe.model.trace import ExpertTracer

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale_all_dim": 1.0}
CONFIGS = {
    "v3-q-lora-yarn": dict(rope_scaling=YARN, max_position_embeddings=128, routed_scaling_factor=2.5),
    "v2-softmax-no-q-lora": dict(
        q_lora_rank=None, scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False
    ),
    "not-interleaved": dict(rope_interleave=False, n_shared_experts=0),
}


def random_model(seed: int, **overrides) -> DeepseekForCausalLM:
    """Weights with std 0.3 (not 0.02) so logits have real margins and routing is far from uniform."""
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(preset("tiny", **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3 if p.dim() > 1 else 0.1)
        for router in model.routers():
            if router.uses_bias:
                router.e_score_correction_bias.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("mla", ["absorb", "naive"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_greedy_generation_equals_uncached_token_for_token(name, mla):
    model = random_model(1, **CONFIGS[name])
    prompts = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(2))
    cfg = SamplingConfig(max_new_tokens=40, strategy="greedy", mla=mla)
    cached = generate(model, prompts, cfg)
    plain = generate(model, prompts, SamplingConfig(max_new_tokens=40, strategy="greedy", use_cache=False))
    assert cached.tokens_BN.shape == (3, 40)
    assert torch.equal(cached.tokens_BN, plain.tokens_BN)
    assert len(set(cached.tokens_BN.reshape(-1).tolist())) > 5  # not a degenerate repeat
    # The cache holds kv_lora_rank + rope_dim values per token and layer, not per-head k and v.
    c = model.config
    assert cached.cache_bytes == 3 * 47 * c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4


def test_cached_top_p_sampling_equals_uncached_and_depends_on_seed():
    model = random_model(3)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    cfg = dict(max_new_tokens=30, strategy="top_p", top_p=0.8, temperature=1.3)
    a = generate(model, prompt, SamplingConfig(**cfg, seed=7))
    b = generate(model, prompt, SamplingConfig(**cfg, seed=7, use_cache=False))
    c = generate(model, prompt, SamplingConfig(**cfg, seed=8))
    assert torch.equal(a.tokens_BN, b.tokens_BN)
    assert not torch.equal(a.tokens_BN, c.tokens_BN)
    greedy = generate(model, prompt, SamplingConfig(max_new_tokens=30))
    assert not torch.equal(a.tokens_BN, greedy.tokens_BN)


@pytest.mark.parametrize("absorb", [True, False])
def test_chunked_prefill_with_cache_equals_one_forward(absorb):
    model = random_model(5, **CONFIGS["v3-q-lora-yarn"])
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 30, absorb=absorb)
        parts = [model(ids[:, :11], cache), model(ids[:, 11:12], cache), model(ids[:, 12:], cache)]
    assert cache.length == 30
    # fp32, logits of magnitude ~10: the absorbed form sums in another order
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-3, atol=1e-4)


def test_eos_stops_generation():
    model = random_model(7)
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(8))
    first = generate(model, prompt, SamplingConfig(max_new_tokens=10)).tokens_BN[0]
    stopped = generate(model, prompt, SamplingConfig(max_new_tokens=10, eos_id=int(first[2])))
    assert stopped.tokens_BN[0].tolist() == first[:3].tolist()


def test_greedy_generation_matches_transformers_generate(tmp_path):
    import transformers  # a test extra: missing, the test fails

    model = random_model(9, **CONFIGS["v3-q-lora-yarn"])
    save_pretrained(model, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(10))
    ours = generate(model, prompt, SamplingConfig(max_new_tokens=25)).tokens_BN
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=25, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours[0], theirs[0, 6:])


def test_expert_trace_sums_to_the_models_own_routing_counts(tmp_path):
    model = random_model(11, **CONFIGS["v3-q-lora-yarn"])
    model.train()  # routers accumulate `expert_load` from the routing kernel's counts in train mode
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(12))
    with ExpertTracer(model, tmp_path / "experts.jsonl") as tracer:
        result = generate(model, prompt, SamplingConfig(max_new_tokens=12), on_forward=tracer.set_context)
    own = torch.stack(model.expert_load()).to(torch.int64)  # (L_moe, E), from fedmoe.kernels.route
    assert torch.equal(tracer.counts_LE, own)
    n_tokens = 2 * (9 + 12 - 1)  # every position fed once (the last sampled token is never fed)
    assert own.sum() == n_tokens * model.config.num_experts_per_tok * len(tracer.layers)

    lines = [json.loads(line) for line in (tmp_path / "experts.jsonl").read_text().splitlines()]
    assert len(lines) == n_tokens * len(tracer.layers)
    from_jsonl = torch.zeros_like(own)
    for line in lines:
        from_jsonl[tracer.layers.index(line["layer"])] += torch.bincount(
            torch.tensor(line["experts"]), minlength=own.shape[1]
        )
        # noaux_tc + norm_topk_prob: combine weights sum to routed_scaling_factor.
        assert math.isclose(sum(line["weights"]), 2.5, rel_tol=1e-4)
    assert torch.equal(from_jsonl, own)
    # Lines carry positions and the tokens that were fed (prompt, then the generated ones).
    seq1 = sorted((line["pos"], line["token"]) for line in lines if line["seq"] == 1 and line["layer"] == 1)
    fed = torch.cat([prompt[1], result.tokens_BN[1, :-1]]).tolist()
    assert seq1 == list(enumerate(fed))

    summary = tracer.summary()
    assert summary["tokens"] == n_tokens
    assert all(math.isclose(sum(layer["share"]), 1.0, rel_tol=1e-4) for layer in summary["layers"])
    png = tracer.write_heatmap(tmp_path / "load.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perplexity_equals_exp_of_the_direct_loss(tmp_path):
    model = random_model(13)
    tok = ByteTokenizer()
    (tmp_path / "eval.jsonl").write_text(
        "\n".join(json.dumps({"text": t}) for t in ["Zahlung 12,50 EUR", "card payment at cafe", "refund"])
    )
    texts = load_texts(tmp_path / "eval.jsonl")
    stream = []
    for t in texts:
        stream += tok.encode(t) + [tok.eos_id]
    # One window: exactly the model's mean next-token loss over the stream.
    one = perplexity(model, token_windows(texts, tok, seq_len=100))
    ids = torch.tensor([stream])
    with torch.no_grad():
        direct = lm_loss(model(ids[:, :-1]), ids[:, 1:]).item()
    assert one.tokens == len(stream) - 1
    assert math.isclose(one.loss, direct, rel_tol=1e-5)
    assert math.isclose(one.perplexity, math.exp(direct), rel_tol=1e-5)
    # Several windows (and batches of mixed length): every token predicted exactly once.
    windows = token_windows(texts, tok, seq_len=16)
    many = perplexity(model, windows, batch_size=2)
    assert many.tokens == len(stream) - 1 and len(windows) == math.ceil((len(stream) - 1) / 16)
    manual = 0.0
    with torch.no_grad():
        for w in windows:
            manual += lm_loss(model(w[None, :-1]), w[None, 1:]).item() * (len(w) - 1)
    assert math.isclose(many.nll, manual, rel_tol=1e-5)


def test_cli_export_generate_evaluate(tmp_path, capsys):
    """The commands a user runs: replica -> export -> generate with a trace -> evaluate."""
    from safetensors.torch import save_file

    from fedmoe.model.lora import LoraConfig, configure_trainable
    from fedmoe.model.trainable import TrainableView

    torch.manual_seed(0)
    base = DeepseekForCausalLM(preset("tiny"))
    save_pretrained(base, tmp_path / "base")
    model = configure_trainable(base, "lora", LoraConfig(rank=4, seed=5))
    with torch.no_grad():
        for p in TrainableView(model).params.values():
            p.normal_(0, 0.05)
    save_file({n: p.detach().contiguous() for n, p in TrainableView(model).params.items()}, str(tmp_path / "r.st"))

    args = ["export", "--base", str(tmp_path / "base"), "--trainable", str(tmp_path / "r.st")]
    assert main([*args, "--lora-rank", "4", "--lora-seed", "5", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "merged" / "config.json").exists()
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    assert "merged" in capsys.readouterr().out

    trace = tmp_path / "trace"
    gen_args = ["generate", str(tmp_path / "out" / "merged"), "--prompt", "Konto", "--max-new-tokens", "8"]
    assert main([*gen_args, "--trace-experts", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "Konto" in out
    assert {p.name for p in trace.iterdir()} >= {"experts.jsonl", "expert_summary.json", "expert_load.png"}
    line = json.loads((trace / "experts.jsonl").read_text().splitlines()[0])
    assert isinstance(line["text"], str) and line["weights"] == sorted(line["weights"], reverse=True)
    assert main([*gen_args, "--trace-experts", str(tmp_path / "counts"), "--no-token-trace"]) == 0
    assert {p.name for p in (tmp_path / "counts").iterdir()} == {"expert_summary.json", "expert_load.png"}
    capsys.readouterr()
    # base + adapter gives the same greedy text as the merged folder
    with_adapter = ["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "out" / "adapter")]
    assert main([*with_adapter, "--prompt", "Konto", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == out.splitlines()[0]

    (tmp_path / "eval.txt").write_text("Überweisung an Café Müller, 12,50 EUR\n" * 20)
    ev = ["evaluate", str(tmp_path / "out" / "merged"), "--data", str(tmp_path / "eval.txt"), "--seq-len", "64"]
    assert main([*ev, "--out", str(tmp_path / "ppl.json"), "--trace-experts", str(tmp_path / "etrace")]) == 0
    report = json.loads((tmp_path / "ppl.json").read_text())
    assert report["tokens"] > 500 and math.isclose(report["perplexity"], math.exp(report["loss"]))
    summary = json.loads((tmp_path / "etrace" / "expert_summary.json").read_text())
    assert summary["tokens"] == report["tokens"]  # every scored input position went through the routers
    assert "perplexity" in capsys.readouterr().out

    # Bad input: one line naming the file, exit 2.
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    assert main(["evaluate", str(tmp_path / "base"), "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2: expected an object with a string 'text' field" in capsys.readouterr().err


def test_heatmap_pair_of_the_same_records_before_and_after(tmp_path):
    from fedmoe.model.trace import write_heatmap_pair

    torch.manual_seed(0)
    model = DeepseekForCausalLM(preset("tiny")).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    tracers = []
    for _ in range(2):
        with ExpertTracer(model) as tracer, torch.no_grad():
            model(ids)
        tracers.append(tracer)
        with torch.no_grad():  # "fine-tuning": move the router
            model.routers()[0].weight.add_(torch.randn_like(model.routers()[0].weight))
    assert not torch.equal(tracers[0].counts_LE, tracers[1].counts_LE)
    path = write_heatmap_pair(tracers[0], tracers[1], tmp_path / "before_after.png", title="bank 0 held-out")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_of_a_right_padded_batch_counts_only_real_tokens(tmp_path):
    torch.manual_seed(0)
    model = DeepseekForCausalLM(preset("tiny")).eval()
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 256, (n,), generator=gen) for n in (11, 5, 8)]
    batch_BT = torch.stack([torch.nn.functional.pad(r, (0, 11 - len(r)), value=0) for r in rows])
    valid_BT = torch.arange(11) < torch.tensor([len(r) for r in rows])[:, None]
    alone = ExpertTracer(model)
    with alone, torch.no_grad():
        for r in rows:
            model(r[None])
    padded = ExpertTracer(model, tmp_path / "experts.jsonl")
    padded.set_context(batch_BT, 0, valid_BT=valid_BT)
    with padded, torch.no_grad():
        model(batch_BT)
    assert padded.tokens == alone.tokens == 24
    assert torch.equal(padded.counts_LE, alone.counts_LE)  # causal: right padding moves no real token's routing
    lines = (tmp_path / "experts.jsonl").read_text().splitlines()
    assert len(lines) == 24 * len(padded.layers) and '"seq":1,"pos":5' not in "".join(lines)
    with pytest.raises(ValueError, match=r"valid mask \(3, 11\), routed batch \(1, 11\)"), padded, torch.no_grad():
        model(batch_BT[:1])
