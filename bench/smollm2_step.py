"""One DP step of the `smollm2-moe` trainable set: time, peak RSS, held-out loss; fp32 vs int8 frozen base.

    .venv/bin/python bench/smollm2_step.py [--batch 8] [--seq-len 128] [--steps 2] [--threads 1]
        [--bases fp32,int8] [--variants nonprivate,mixed] [--eval-windows 16]

Prints ONE JSON line. The model is the smollm2-moe recipe (SmolLM2-135M-Instruct upcycled to 8 x 384
routed experts, top-2, + the 1536-wide shared expert; ~/.cache/fedmoe, built on first use), with
FFA-LoRA rank 8 on q/k/v/o_proj and the routed experts (only B trained). Data: synthetic bank 0's
records tokenized with SmolLM2's tokenizer, packed into --batch x --seq-len windows.

For each base ("fp32"; "int8": fedmoe.model.quant.quantize_frozen_ after LoRA) and each variant
("nonprivate": forward + backward + clip + AdamW; "mixed": fedmoe.fl_client.dp.make_private,
book-keeping mixed ghost clipping, the default), one fresh subprocess loads the model, runs a
warm-up step and --steps timed steps, and reports its fastest step and its peak RSS (VmHWM, torch's
import and the model load included). Held-out loss: the base before any step, on --eval-windows
windows of bank 0's later records (fp32 vs int8 is the cost of the 8-bit base).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmoe.fl_client.data.synthetic import generate_bank_corpus, make_bank_profiles  # noqa: E402
from fedmoe.fl_client.dp import DPConfig, make_private  # noqa: E402
from fedmoe.model.checkpoint import load_pretrained  # noqa: E402
from fedmoe.model.deepseek import lm_loss  # noqa: E402
from fedmoe.model.evaluate import perplexity, token_windows  # noqa: E402
from fedmoe.model.lora import LoraConfig, configure_trainable  # noqa: E402
from fedmoe.model.quant import int8_bytes, quantize_frozen_  # noqa: E402
from fedmoe.model.tokenizer import load_tokenizer  # noqa: E402
from fedmoe.model.trainable import TrainableView  # noqa: E402
from fedmoe.model.upcycle import smollm2_moe  # noqa: E402

LORA = LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "experts"))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def bank_windows(folder: Path, eos_id: int, seq_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    records = [r["text"] for r in generate_bank_corpus(make_bank_profiles(3, seed=0)[0], 400, seed=0)]
    tok = load_tokenizer(folder, eos_id=eos_id)
    return token_windows(records[:300], tok, seq_len), token_windows(records[300:], tok, seq_len)


def worker(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(args.threads)
    folder = smollm2_moe()
    model = load_pretrained(folder)
    configure_trainable(model, "lora", LORA)
    if args.base == "int8":
        quantize_frozen_(model)
    train, held_out = bank_windows(folder, model.config.eos_token_id, args.seq_len)
    batch = torch.stack([w for w in train if w.numel() == args.seq_len + 1][: args.batch])
    inputs, targets = batch[:, :-1], batch[:, 1:]
    model.eval()
    result = perplexity(model, held_out[: args.eval_windows], batch_size=8)
    model.train()
    params = list(TrainableView(model).params.values())
    if args.variant == "nonprivate":
        optimizer = torch.optim.AdamW(params, lr=1e-3)

        def step() -> None:
            loss = lm_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
    else:
        cfg = DPConfig(target_epsilon=1.0, delta=1e-5, expected_batch_size=args.batch, physical_batch_size=args.batch)
        gen = torch.Generator().manual_seed(0)
        private = make_private(model, cfg, noise_multiplier=1.0, seq_len=args.seq_len, generator=gen)

        def step() -> None:
            private.backward(inputs, targets)
            private.optimizer.step()
            private.optimizer.zero_grad(set_to_none=True)

    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return {
        "step_s": round(min(times[1:]), 2),
        "warmup_step_s": round(times[0], 2),
        "peak_rss_mb": round(peak_rss_mb(), 0),
        "held_out_loss": round(result.loss, 4),
        "held_out_tokens": result.tokens,
        "trainable_params": sum(p.numel() for p in params),
        "int8_mb": round(int8_bytes(model) / 2**20, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--bases", default="fp32,int8")
    p.add_argument("--variants", default="nonprivate,mixed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    smollm2_moe()  # build the cache once, outside the measured processes
    out: dict[str, object] = {"batch": args.batch, "seq_len": args.seq_len, "threads": args.threads}
    for base in args.bases.split(","):
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--worker", "--base", base, "--variant", variant]
            cmd += ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
            cmd += ["--threads", str(args.threads), "--eval-windows", str(args.eval_windows)]
            run = subprocess.run(cmd, check=True, capture_output=True, text=True)
            out[f"{base}_{variant}"] = json.loads(run.stdout.strip().splitlines()[-1])
    for base in args.bases.split(","):
        a, b = out.get(f"{base}_mixed"), out.get(f"{base}_nonprivate")
        if isinstance(a, dict) and isinstance(b, dict):
            out[f"{base}_private_over_nonprivate"] = round(a["step_s"] / b["step_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
