"""Command line for a fine-tuned model: export, generate, evaluate (`python -m fedmoe.model -h`).

    python -m fedmoe.model export   --base CKPT [--adapter DIR | --trainable replica.safetensors --lora-rank 8 ...]
                             --out OUT [--form all|merged|adapter] [--dtype bf16]
    python -m fedmoe.model generate MODEL [--adapter DIR] --prompt "..." [--top-p 0.9] [--trace-experts DIR]
    python -m fedmoe.model evaluate MODEL [--adapter DIR] --data eval.jsonl [--seq-len 256] [--trace-experts DIR]
    python -m fedmoe.model upcycle  (--dense LLAMA_DIR --out DIR | --recipe smollm2-moe [--cache-dir DIR])
                             [--experts 8] [--top-k 2] [--expert-width 384] [--seed 0]

MODEL is an HF DeepSeek folder (a base or a merged export); --adapter puts an exported adapter
(fedmoe.model.export) on top. Errors in inputs print one line naming the file/field and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedmoe.model.deepseek import DeepseekForCausalLM, preset
from fedmoe.model.errors import ModelError
from fedmoe.model.evaluate import load_texts, perplexity, token_windows
from fedmoe.model.export import (
    export_adapter,
    export_base,
    export_job,
    export_merged,
    load_adapter,
    load_model,
    load_trainable,
)
from fedmoe.model.generate import SamplingConfig, generate
from fedmoe.model.lora import ALL_TARGETS, LoraConfig, configure_trainable
from fedmoe.model.tokenizer import load_tokenizer
from fedmoe.model.trace import ExpertTracer
from fedmoe.model.upcycle import DEFAULT_CACHE, RECIPES, UpcycleSpec, upcycle_folder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else DTYPES[name]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fedmoe.model", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("export", help="write a fine-tuned model as merged HF folder and/or adapter")
    src = ex.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", type=Path, help="base checkpoint folder")
    src.add_argument("--preset", help="base = this preset with seeded init (as a job without base-checkpoint)")
    ex.add_argument("--init-seed", type=int, default=0, help="torch seed of the preset's init [0]")
    ad = ex.add_mutually_exclusive_group(required=True)
    ad.add_argument("--adapter", type=Path, help="an exported adapter folder")
    ad.add_argument("--trainable", type=Path, help="named trainable tensors (a bank's replica.safetensors)")
    ex.add_argument("--lora-rank", type=int, default=8)
    ex.add_argument("--lora-alpha", type=float, default=16.0)
    ex.add_argument("--lora-seed", type=int, default=0, help="the job seed the frozen A factors came from [0]")
    ex.add_argument(
        "--lora-targets",
        default=",".join(LoraConfig().targets),
        help=f"comma-separated, from {list(ALL_TARGETS)} [{','.join(LoraConfig().targets)}]",
    )
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--form", choices=["all", "merged", "adapter"], default="all")
    ex.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="dtype of written weights")

    up = sub.add_parser("upcycle", help="dense Llama checkpoint -> MoE with the same logits (docs/model.md)")
    what = up.add_mutually_exclusive_group(required=True)
    what.add_argument("--dense", type=Path, help="a dense HF Llama folder (with --out)")
    what.add_argument("--recipe", choices=sorted(RECIPES), help="a named base, dequantized and cached")
    up.add_argument("--out", type=Path, help="the MoE folder to write (with --dense)")
    up.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"recipe cache root [{DEFAULT_CACHE}]")
    up.add_argument("--experts", type=int, default=UpcycleSpec.n_experts, help="routed experts [8]")
    up.add_argument("--top-k", type=int, default=UpcycleSpec.top_k, help="routed experts per token [2]")
    up.add_argument("--expert-width", type=int, default=UpcycleSpec.expert_width, help="routed expert width [384]")
    up.add_argument("--seed", type=int, default=UpcycleSpec.seed, help="seed of the router and expert slices [0]")
    up.add_argument("--print-path", action="store_true", help="print only the MoE folder's path (for scripts)")

    for name, help_ in (("generate", "generate text"), ("evaluate", "perplexity on a text/JSONL file")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("model", type=Path, help="HF DeepSeek folder (base or merged)")
        sp.add_argument("--adapter", type=Path, help="adapter folder to apply on top")
        sp.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "auto"], default="fp32")
        sp.add_argument("--trace-experts", type=Path, help="write experts.jsonl, expert_summary.json, expert_load.png")
        sp.add_argument("--no-token-trace", action="store_true", help="with --trace-experts: skip experts.jsonl")
        sp.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 on a busy machine)")
        if name == "generate":
            sp.add_argument("--prompt", action="append", default=[], help="repeatable")
            sp.add_argument("--prompts-file", type=Path, help="one prompt per line (.txt) or a 'text' field (.jsonl)")
            sp.add_argument("--max-new-tokens", type=int, default=64)
            sp.add_argument("--top-p", type=float, help="nucleus sampling with this p (default: greedy)")
            sp.add_argument("--temperature", type=float, default=1.0)
            sp.add_argument("--seed", type=int, default=0)
            sp.add_argument("--no-cache", action="store_true", help="re-run the whole sequence each step")
            sp.add_argument(
                "--mla", choices=["absorb", "naive"], default="absorb", help="cached attention form [absorb]"
            )
        else:
            sp.add_argument("--data", type=Path, required=True, help=".jsonl with a 'text' field, or plain text")
            sp.add_argument("--seq-len", type=int, default=256)
            sp.add_argument("--batch-size", type=int, default=8)
            sp.add_argument("--limit", type=int, help="evaluate only the first N records")
            sp.add_argument("--out", type=Path, help="write the result as JSON here")
    return p.parse_args(argv)


def _export(args: argparse.Namespace, console: Console) -> None:
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.base is not None:
        model = load_model(args.base)
    else:
        torch.manual_seed(args.init_seed)  # the same seeded init a job without base-checkpoint uses
        model = DeepseekForCausalLM(preset(args.preset))
    if args.adapter is not None:
        load_adapter(model, args.adapter)
        meta_path = args.adapter / "fedmoe_lora.json"
        seed = json.loads(meta_path.read_text(encoding="utf-8")).get("seed") if meta_path.exists() else None
    else:
        targets = tuple(t for t in args.lora_targets.split(",") if t)
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=targets, seed=args.lora_seed)
        configure_trainable(model, "lora", lora)
        load_trainable(model, args.trainable)
        seed = args.lora_seed
    model.eval()
    if args.form == "all":
        written = export_job(model, args.out, base_dir=args.base, dtype=dtype, seed=seed)
    elif args.form == "merged":
        written = {"merged": export_merged(model, args.out, dtype=dtype, tokenizer_dir=args.base)}
    else:
        written = {"adapter": export_adapter(model, args.out, base_model_name_or_path=args.base, seed=seed)}
        if args.base is None:
            written["base"] = export_base(model, args.out / "base", dtype=dtype)
    for form, path in written.items():
        console.print(f"{form:8s} -> {path}")


def _load(args: argparse.Namespace) -> tuple[DeepseekForCausalLM, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, adapter_dir=args.adapter, dtype=_dtype(args.dtype))
    tokenizer = load_tokenizer(args.model, eos_id=model.config.eos_token_id)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ModelError(f"tokenizer has {tokenizer.vocab_size} ids, model vocab_size is {model.config.vocab_size}")
    return model, tokenizer


def _tracer(args: argparse.Namespace, model: DeepseekForCausalLM, tokenizer) -> ExpertTracer | None:
    if not args.trace_experts:
        return None
    jsonl = None if args.no_token_trace else args.trace_experts / "experts.jsonl"
    return ExpertTracer(model, jsonl, decode=lambda i: tokenizer.decode([i]))


def _write_trace(tracer: ExpertTracer, out_dir: Path, console: Console) -> None:
    tracer.write_summary(out_dir / "expert_summary.json")
    tracer.write_heatmap(out_dir / "expert_load.png")
    worst = max((layer["max_over_mean_load"] for layer in tracer.summary()["layers"]), default=0.0)
    jsonl = f"{out_dir / 'experts.jsonl'}, " if (out_dir / "experts.jsonl").exists() else ""
    console.print(
        f"expert trace: {jsonl}{out_dir / 'expert_summary.json'}, "
        f"{out_dir / 'expert_load.png'} (max/mean expert load {worst:.2f})"
    )


def _generate(args: argparse.Namespace, console: Console) -> None:
    model, tokenizer = _load(args)
    prompts = list(args.prompt)
    if args.prompts_file:
        if args.prompts_file.suffix == ".jsonl":
            prompts += load_texts(args.prompts_file)
        else:
            prompts += [line for line in args.prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ModelError("generate: give --prompt TEXT (repeatable) or --prompts-file FILE")
    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        strategy="top_p" if args.top_p is not None else "greedy",
        top_p=args.top_p if args.top_p is not None else 1.0,
        temperature=args.temperature,
        seed=args.seed,
        eos_id=tokenizer.eos_id,
        use_cache=not args.no_cache,
        mla=args.mla,
    )
    tracer = _tracer(args, model, tokenizer)
    total_tokens, total_seconds = 0, 0.0
    with tracer if tracer is not None else contextlib.nullcontext():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([tokenizer.encode(prompt)])
            if ids.shape[1] == 0:
                raise ModelError(f"generate: prompt {i} encodes to no tokens")
            hook = (lambda feed, start, i=i: tracer.set_context(feed, start, seq_offset=i)) if tracer else None
            result = generate(model, ids, cfg, on_forward=hook)
            new = result.tokens_BN[0].tolist()
            if tokenizer.eos_id in new:
                new = new[: new.index(tokenizer.eos_id)]
            console.print(f"[bold]{escape(prompt)}[/]{escape(tokenizer.decode(new))}", highlight=False)
            console.print(
                f"[dim]{result.new_tokens} tokens in {result.seconds:.2f} s: {result.tokens_per_second:.1f} tokens/s "
                f"({result.decode_tokens_per_second:.1f} tokens/s decode after a "
                f"{result.prefill_seconds * 1000:.0f} ms prefill of {result.prompt_len} tokens), "
                f"{'KV cache ' + format(result.cache_bytes / 1024, '.0f') + ' KiB' if cfg.use_cache else 'no cache'}[/]"
            )
            total_tokens += result.new_tokens
            total_seconds += result.seconds
    if len(prompts) > 1:
        console.print(f"total: {total_tokens} tokens, {total_tokens / max(total_seconds, 1e-9):.1f} tokens/s")
    if tracer is not None:
        _write_trace(tracer, args.trace_experts, console)


def _evaluate(args: argparse.Namespace, console: Console) -> None:
    model, tokenizer = _load(args)
    texts = load_texts(args.data)[: args.limit]
    windows = token_windows(texts, tokenizer, args.seq_len)
    if not windows:
        raise ModelError(f"{args.data}: fewer than 2 tokens to evaluate")
    tracer = _tracer(args, model, tokenizer)
    with (
        tracer if tracer is not None else contextlib.nullcontext(),
        Progress(
            TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
        ) as progress,
    ):
        task = progress.add_task("eval", total=len(windows))
        result = perplexity(
            model,
            windows,
            batch_size=args.batch_size,
            on_forward=(lambda ids, first: tracer.set_context(ids, 0, seq_offset=first)) if tracer else None,
            on_progress=lambda done: progress.update(task, completed=done),
        )
    console.print(
        f"{args.data}: {len(texts)} records, {result.tokens} tokens: loss {result.loss:.4f}, "
        f"perplexity {result.perplexity:.3f} ({result.tokens_per_second:.0f} tokens/s)"
    )
    if args.out:
        report = {
            "data": str(args.data),
            "model": str(args.model),
            "adapter": str(args.adapter) if args.adapter else None,
            "records": len(texts),
            "tokens": result.tokens,
            "loss": result.loss,
            "perplexity": result.perplexity,
            "tokens_per_second": result.tokens_per_second,
            "seq_len": args.seq_len,
        }
        from fedmoe.protocol.files import atomic_write_json

        atomic_write_json(args.out, report)
    if tracer is not None:
        _write_trace(tracer, args.trace_experts, console)


def _upcycle(args: argparse.Namespace, console: Console) -> None:
    spec = UpcycleSpec(n_experts=args.experts, top_k=args.top_k, expert_width=args.expert_width, seed=args.seed)
    if args.recipe:
        out = RECIPES[args.recipe](args.cache_dir, spec)
    elif args.out is None:
        raise ModelError("upcycle: --dense needs --out")
    else:
        out = upcycle_folder(args.dense, args.out, spec)
    if args.print_path:
        print(out)
    else:
        console.print(f"upcycled -> {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(soft_wrap=True)  # generated text and paths are never re-wrapped
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        commands = {"export": _export, "generate": _generate, "evaluate": _evaluate, "upcycle": _upcycle}
        commands[args.command](args, console)
    except ModelError as err:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
