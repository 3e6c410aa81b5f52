"""One DP-SGD step vs one non-private step on the `small` preset: time and peak memory.

    .venv/bin/python bench/dp_step.py [--batch 16] [--seq-len 128] [--reps 8] [--threads 1]

Prints ONE JSON line. For each train mode ("lora": FFA-LoRA on attention + experts; and
"router+experts": the router and full expert banks) and each variant:
    nonprivate  forward + backward + global-norm clip + AdamW (as fedmoe.fl_client.train.train_local)
    hooks       Opacus GradSampleModule + DPOptimizer (every per-sample gradient instantiated)
    ghost       Opacus fast gradient clipping, ghost norms everywhere (two backward passes)
    mixed       book-keeping mixed ghost clipping (one backward pass; fedmoe.fl_client.dp.bookkeeping)
    mixed-secure  mixed with secure_mode: noise from the OS CSPRNG (the default of every deployment);
                `secure_cost_ratio` = mixed-secure / mixed, measured in the same run
one logical batch = one physical batch of --batch samples of --seq-len tokens, AdamW, noise on.
Allocator: as a bank's training loops do (fedmoe.fl_client.memory.reused_memory), freed blocks
are reused instead of faulted in afresh every step, for every variant alike; `--default-malloc`
measures glibc's default (`"malloc"` in the JSON says which ran).

Timing: all variants of a mode live in one process and run round-robin (--reps rounds after a
warm-up), so a busy machine slows them alike; `*_ms` is the fastest round, `*_median_ms` the
median, `*_ratio` fastest / fastest non-private, `*_paired_ratio` the median over rounds of the
variant's time / the non-private time of the same round (`secure_cost_paired_ratio`: mixed-secure /
mixed), the one to read on a loaded host. Peak RSS: each variant runs again alone in a
fresh subprocess (warm-up + 2 steps) and reports its peak RSS (VmHWM); torch's import included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmoe.fl_client.dp import DPConfig, make_private  # noqa: E402
from fedmoe.fl_client.memory import keep_freed_memory  # noqa: E402
from fedmoe.model.deepseek import DeepseekForCausalLM, lm_loss, preset  # noqa: E402
from fedmoe.model.lora import LoraConfig, configure_trainable  # noqa: E402
from fedmoe.model.trainable import TrainableView  # noqa: E402

MODES = ("lora", "router+experts")
VARIANTS = ("nonprivate", "hooks", "ghost", "mixed", "mixed-secure")


def build_step(mode: str, variant: str, args: argparse.Namespace) -> tuple[Callable[[], None], int]:
    """A closure running one training step of `variant`, and the number of trainable parameters."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(preset("small"))
    configure_trainable(model, mode, LoraConfig(rank=8) if mode == "lora" else None)
    model.train()
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    inputs = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)
    targets = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)
    params = list(TrainableView(model).params.values())
    if variant == "nonprivate":
        optimizer = torch.optim.AdamW(params, lr=1e-3)

        def step() -> None:
            loss = lm_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

        return step, sum(p.numel() for p in params)
    secure = variant.endswith("-secure")
    cfg = DPConfig(
        target_epsilon=1.0,
        delta=1e-5,
        expected_batch_size=args.batch,
        physical_batch_size=args.batch,
        grad_sample_mode=variant.removesuffix("-secure"),
        optimizer="adamw",
        secure_mode=secure,
    )
    private = make_private(model, cfg, noise_multiplier=1.0, seq_len=args.seq_len, generator=None if secure else gen)

    def private_step() -> None:
        private.backward(inputs, targets)
        private.optimizer.step()
        private.optimizer.zero_grad(set_to_none=True)

    return private_step, sum(p.numel() for p in params)


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux: VmHWM (ru_maxrss survives fork+exec: a child would report
    its parent's peak when that was larger); elsewhere ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    per_mb = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb


def peak_rss_worker(args: argparse.Namespace) -> None:
    step, _ = build_step(args.mode, args.variant, args)
    for _ in range(3):
        step()
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss(mode: str, variant: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--variant", variant]
    cmd += ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    cmd += ["--default-malloc"] if args.default_malloc else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return round(json.loads(out)["peak_rss_mb"], 1)


def time_mode(mode: str, args: argparse.Namespace) -> dict[str, object]:
    built = {v: build_step(mode, v, args) for v in VARIANTS}
    steps = {v: s for v, (s, _) in built.items()}
    for step in steps.values():  # warm-up: allocator, first-call dispatch, lazy imports
        step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.reps):
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            times[variant].append((time.perf_counter() - start) * 1e3)
    result: dict[str, object] = {"trainable_params": built["nonprivate"][1]}
    base = min(times["nonprivate"])
    for variant in VARIANTS:
        ts = sorted(times[variant])
        result[f"{variant}_ms"] = round(ts[0], 1)
        result[f"{variant}_median_ms"] = round(ts[len(ts) // 2], 1)
        if variant != "nonprivate":
            result[f"{variant}_ratio"] = round(ts[0] / base, 2)
            result[f"{variant}_paired_ratio"] = paired_ratio(times[variant], times["nonprivate"])
    result["secure_cost_ratio"] = round(min(times["mixed-secure"]) / min(times["mixed"]), 3)
    result["secure_cost_paired_ratio"] = paired_ratio(times["mixed-secure"], times["mixed"])
    return result


def paired_ratio(times: list[float], base_times: list[float]) -> float:
    """Median over rounds of time / base time in the same round: steadier than fastest / fastest
    when the host's load drifts (the two ran seconds apart, not minutes)."""
    ratios = sorted(t / b for t, b in zip(times, base_times, strict=True))
    return round(ratios[len(ratios) // 2], 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared box)")
    p.add_argument("--no-rss", action="store_true", help="skip the per-variant peak-RSS subprocesses")
    p.add_argument("--default-malloc", action="store_true", help="glibc's default allocator settings (no reuse)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    reused = not args.default_malloc and keep_freed_memory()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.worker:
        peak_rss_worker(args)
        return
    report: dict[str, object] = {
        "bench": "dp_step",
        "preset": "small",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "reps": args.reps,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "malloc": "reused" if reused else "default",
    }
    rss = {m: {v: peak_rss(m, v, args) for v in VARIANTS} for m in MODES} if not args.no_rss else {}
    for mode in MODES:
        result = time_mode(mode, args)
        if rss:
            result["peak_rss_mb"] = rss[mode]
        report[mode] = result
    print(json.dumps(report, separators=(",", ":")))


if __name__ == "__main__":
    main()
