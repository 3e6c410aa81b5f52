"""Local fine-tuning of one bank (no federation, no DP): `python -m fedmoe.fl_client.local`.

Builds the model (a preset, or a checkpoint folder), loads the bank's data (its own JSONL/CSV/
Parquet file, or its slice of the synthetic corpus), reports eval loss/perplexity before and
after, and saves the fine-tuned checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file

from fedmoe.fl_client.data import (
    generate_bank_corpus,
    load_text_file,
    make_bank_profiles,
    pack_records,
    train_eval_split,
)
from fedmoe.fl_client.errors import DataError
from fedmoe.fl_client.train import TrainConfig, evaluate, train_local
from fedmoe.model.checkpoint import load_pretrained, save_pretrained
from fedmoe.model.deepseek import DeepseekForCausalLM, preset
from fedmoe.model.errors import ModelError
from fedmoe.model.lora import LoraConfig, configure_trainable
from fedmoe.model.tokenizer import load_tokenizer
from fedmoe.model.trainable import TrainableView


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fedmoe.fl_client.local", description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="small", help="model preset (random init) [small]")
    src.add_argument("--checkpoint", type=Path, help="HF-format checkpoint folder to fine-tune")
    p.add_argument("--data", type=Path, help="the bank's own JSONL/CSV/Parquet with a 'text' column")
    p.add_argument("--bank", type=int, default=0, help="synthetic bank index when --data is not given [0]")
    p.add_argument("--n-banks", type=int, default=3, help="banks in the synthetic federation [3]")
    p.add_argument("--records", type=int, default=4000, help="synthetic records for this bank [4000]")
    p.add_argument("--mode", default="full", choices=["lora", "router+experts", "full"])
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=150, help="training steps; 0 = only evaluate [150]")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/local"), help="where the checkpoint and report go")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if args.steps < 0:
        console.print(f"[bold red]error:[/] --steps expected >= 0, got {args.steps}")
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    try:
        if args.checkpoint:
            model = load_pretrained(args.checkpoint)
            tokenizer = load_tokenizer(args.checkpoint, eos_id=model.config.eos_token_id)
        else:
            model = DeepseekForCausalLM(preset(args.preset))
            tokenizer = load_tokenizer(None)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ModelError(f"tokenizer has {tokenizer.vocab_size} ids, model vocab_size is {model.config.vocab_size}")
        configure_trainable(model, args.mode, LoraConfig(rank=args.lora_rank, seed=args.seed))

        if args.data:
            records = load_text_file(args.data)
            source = str(args.data)
        else:
            profile = make_bank_profiles(args.n_banks, seed=args.seed)[args.bank]
            records = generate_bank_corpus(profile, args.records, seed=args.seed)
            source = f"synthetic bank {profile.bank_id} ({profile.locale}, {profile.currency})"
        train_records, eval_records = train_eval_split(
            records, eval_fraction=0.1, seed=args.seed, privacy_unit="record"
        )
        pack = dict(encode=tokenizer.encode, seq_len=args.seq_len, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        train = pack_records(train_records, privacy_unit="record", mode="concat", **pack)
        held_out = pack_records(eval_records, privacy_unit="record", mode="concat", **pack)
    except (DataError, ModelError) as err:
        console.print(f"[bold red]error:[/] {err}")
        return 2

    view = TrainableView(model)
    console.print(
        f"[bold]fedmoe local fine-tuning[/]  model={args.checkpoint or args.preset} "
        f"({model.num_parameters() / 1e6:.2f}M params, {view.numel / 1e6:.2f}M trainable, mode={args.mode})"
    )
    console.print(
        f"data: {source}: {len(train_records)} train / {len(eval_records)} eval records -> "
        f"{train.inputs.shape[0]} x {args.seq_len} train samples"
    )
    before = evaluate(model, held_out.inputs, held_out.targets)
    console.print(f"eval loss before: {before:.4f} (ppl {math.exp(before):.1f})")
    if args.steps == 0:  # evaluation only
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"eval_loss": before, "perplexity": math.exp(before), "source": source, "mode": args.mode}
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return 0
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)

    started = time.perf_counter()
    with Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("train", total=cfg.steps, loss=float("nan"))
        result = train_local(
            model,
            train.inputs,
            train.targets,
            cfg,
            on_step=lambda step, loss: progress.update(task, advance=1, loss=loss),
        )
    after = evaluate(model, held_out.inputs, held_out.targets)
    seconds = time.perf_counter() - started
    console.print(
        f"eval loss after:  {after:.4f} (ppl {math.exp(after):.1f})  [{seconds:.0f} s, "
        f"{result.tokens / result.seconds:.0f} train tokens/s]"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "full":
        save_pretrained(model, args.out / "checkpoint")
    else:  # adapters / expert weights only: the base checkpoint stays where it is
        save_file({n: p.detach().contiguous() for n, p in view.params.items()}, str(args.out / "trainable.safetensors"))
    report = {
        "eval_loss_before": before,
        "eval_loss_after": after,
        "seconds": seconds,
        "train_config": asdict(cfg),
        "mode": args.mode,
        "source": source,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    console.print(f"report: {args.out / 'report.json'}")
    return 0 if after < before else 1


if __name__ == "__main__":
    sys.exit(main())
