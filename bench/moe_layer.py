"""Time one routed-expert MoE layer, forward + backward, on every expert-GEMM path; print one JSON line.

Layer (routed experts only; the shared experts are a plain dense MLP and not measured):
    logits = x W_router^T -> route (top-k) -> rows = tokens repeated per slot
    y_rows = down(swiglu(gate_up(rows))) per expert -> y_t = sum_k w_tk y_rows(t, k)
Entries:
    mask_loop      per-expert boolean-mask loop (HF / torchtitan "for comparison" experts)
    sorted_loop    sort by expert, one matmul per expert (kernels' reference)
    grouped_mm     torch.nn.functional.grouped_mm
    triton         kernels' Triton path (CUDA only; skipped with a reason elsewhere)
    dense_ceiling  one dense MLP over the same N = T*K rows: same FLOPs, no routing overhead
    dp_*           DP-SGD book-keeping step on the same layer: backward for activation grads
                   only, per-sample grad norms of both expert banks, clip, then the clipped
                   weight grads in one pass (fedmoe.kernels.per_sample)
Timing: entries take turns within each rep (after 2 warm-up reps), median per entry; `ratios`:
dense_ceiling_over_grouped_mm (the share of the dense ceiling the grouped layer reaches) and
dp_grouped_mm_over_dp_sorted_loop (< 1: the DP grouped path is the faster).
Allocator: as a bank's training does (fedmoe.fl_client.memory.reused_memory), freed blocks are reused
instead of faulted in afresh every rep, for every entry alike; `--default-malloc` keeps glibc's default.
TFLOP/s counts the expert GEMMs only, forward + backward (3 x 2 N (2FD + FD)), for every entry
(DP entries do extra norm work on top, so theirs is an effective rate).

GPU default: DeepSeek-V2-Lite shape T=4096, d=2048, f=1408, E=64, top-6, bf16, B=8 samples.
CPU default: T=512, d=256, f=128, E=16, top-4, fp32, B=4.
Run: python bench/moe_layer.py [--tokens T --dim D --hidden F --experts E --top-k K --samples B --threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a fresh clone runs it without installing

from fedmoe.fl_client.memory import keep_freed_memory  # noqa: E402
from fedmoe.kernels import (  # noqa: E402
    RoutingSpec,
    align_by_expert,
    expert_grad_norm2,
    expert_linear,
    expert_weight_grad_clipped,
    route,
)
from fedmoe.kernels.backend import triton_reason  # noqa: E402


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over the stacked [gate | up] halves, as the model's experts compute it."""
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def expert_mlp(rows, ids, gate_up, down, *, backend: str):
    """What the model runs per routed expert: expert_linear (gate|up) -> SwiGLU -> expert_linear (down)."""
    return expert_linear(swiglu(expert_linear(rows, ids, gate_up, backend=backend)), ids, down, backend=backend)


def mask_loop_experts(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    out_TD = torch.zeros_like(x_TD)
    for e in range(gate_up_E2FD.shape[0]):
        tok, slot = torch.where(ids_TK == e)
        if tok.numel():
            y = swiglu(x_TD[tok] @ gate_up_E2FD[e].t()) @ down_EDF[e].t()
            out_TD = out_TD.index_add(0, tok, y * weights_TK[tok, slot, None].to(y.dtype))
    return out_TD


def combine(y_rows_ND, weights_TK):
    """The model's combine (fedmoe.model.deepseek.MoE): a batched [1, K] @ [K, D] per token."""
    T, K = weights_TK.shape
    return torch.bmm(weights_TK.view(T, 1, K).to(y_rows_ND.dtype), y_rows_ND.view(T, K, -1)).view(T, -1)


def make_layer(args, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def param(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    d, f, e = args.dim, args.hidden, args.experts
    return {
        "x": param(args.tokens, d, scale=1.0),
        "router": param(e, d, scale=d**-0.5),
        "gate_up": param(e, 2 * f, d, scale=d**-0.5),
        "down": param(e, d, f, scale=f**-0.5),
        "dense_gate_up": param(2 * f, d, scale=d**-0.5),
        "dense_down": param(d, f, scale=f**-0.5),
    }


def moe_step(layer, spec, backend: str, grad_out):
    """Forward + backward of the routed experts on one backend ('mask_loop' or a kernels backend)."""
    x = layer["x"]
    kernel_backend = "reference" if backend in ("mask_loop", "sorted_loop") else backend
    weights, ids, _ = route(x @ layer["router"].t(), None, spec, backend=kernel_backend)
    if backend == "mask_loop":
        y = mask_loop_experts(x, ids, weights, layer["gate_up"], layer["down"])
    else:
        rows = x.repeat_interleave(spec.top_k, dim=0)
        y_rows = expert_mlp(rows, ids.reshape(-1), layer["gate_up"], layer["down"], backend=kernel_backend)
        y = combine(y_rows, weights)
    y.backward(grad_out)


def dense_step(layer, spec, grad_out):
    rows = layer["x"].repeat_interleave(spec.top_k, dim=0)
    y_rows = swiglu(rows @ layer["dense_gate_up"].t()) @ layer["dense_down"].t()
    y_rows.view(grad_out.shape[0], spec.top_k, -1).sum(1).backward(grad_out)


def dp_step(layer, spec, backend: str, grad_out, n_samples: int, max_norm: float = 1.0):
    """Book-keeping DP step for the two expert banks: norms, clip factors, clipped weight grads."""
    x = layer["x"]
    gate_up, down = layer["gate_up"].detach(), layer["down"].detach()  # weight grads come from BK
    T, K, E = x.shape[0], spec.top_k, spec.n_experts
    weights, ids_TK, _ = route(x @ layer["router"].t(), None, spec, backend=backend)
    ids = ids_TK.reshape(-1)
    sample_ids = (torch.arange(T * K, device=x.device) // K) * n_samples // T  # contiguous sequences
    align = align_by_expert(ids, E, sample_ids, n_samples, backend="triton" if backend == "triton" else "reference")
    rows = x.repeat_interleave(K, dim=0)
    h = expert_linear(rows, ids, gate_up, alignment=align, backend=backend)
    act = swiglu(h)
    y_rows = expert_linear(act, ids, down, alignment=align, backend=backend)
    grad_x, grad_h, grad_y_rows = torch.autograd.grad(combine(y_rows, weights), [x, h, y_rows], grad_out)
    act, rows = act.detach(), rows.detach()
    norm2 = expert_grad_norm2(rows, grad_h, ids, sample_ids, n_samples, E, alignment=align, backend=backend)
    norm2 = norm2 + expert_grad_norm2(act, grad_y_rows, ids, sample_ids, n_samples, E, alignment=align, backend=backend)
    clip = (max_norm / (norm2.sqrt() + 1e-6)).clamp(max=1.0)
    expert_weight_grad_clipped(rows, grad_h, ids, sample_ids, clip, E, alignment=align, backend=backend)
    expert_weight_grad_clipped(act, grad_y_rows, ids, sample_ids, clip, E, alignment=align, backend=backend)
    return grad_x


def time_round_robin(
    entries: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int
) -> dict[str, list[float]]:
    """Wall times in ms of each entry, the entries taking turns within every rep, so a shared
    machine's load slows them alike; an entry that raises is timed no further (its error kept)."""
    times: dict[str, list[float]] = {name: [] for name in entries}
    live = dict(entries)
    for rep in range(warmup + reps):
        for name, fn in list(live.items()):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as err:  # one failing path should not hide the others' numbers
                times[name] = [f"{type(err).__name__}: {err}"]
                del live[name]
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    on_gpu = torch.cuda.is_available()
    defaults = (4096, 2048, 1408, 64, 6, 8) if on_gpu else (512, 256, 128, 16, 4, 4)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in zip(
        ("--tokens", "--dim", "--hidden", "--experts", "--top-k", "--samples"), defaults, strict=True
    ):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--reps", type=int, default=20 if on_gpu else 5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--default-malloc", action="store_true", help="glibc's default allocator settings (no reuse)")
    args = parser.parse_args()
    reused = not args.default_malloc and keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    spec = RoutingSpec(args.experts, args.top_k)
    layer = make_layer(args, device, dtype)
    grad_out = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    n_rows = args.tokens * args.top_k
    flops = 3 * 2 * n_rows * 3 * args.dim * args.hidden

    def zero_grads():
        for p in layer.values():
            p.grad = None

    triton_why = triton_reason(layer["x"])
    entries: dict[str, Callable[[], object] | str] = {
        "mask_loop": lambda: moe_step(layer, spec, "mask_loop", grad_out),
        "sorted_loop": lambda: moe_step(layer, spec, "sorted_loop", grad_out),
        "grouped_mm": lambda: moe_step(layer, spec, "grouped_mm", grad_out),
        "triton": triton_why or (lambda: moe_step(layer, spec, "triton", grad_out)),
        "dense_ceiling": lambda: dense_step(layer, spec, grad_out),
        "dp_sorted_loop": lambda: dp_step(layer, spec, "reference", grad_out, args.samples),
        "dp_grouped_mm": lambda: dp_step(layer, spec, "grouped_mm", grad_out, args.samples),
        "dp_triton": triton_why or (lambda: dp_step(layer, spec, "triton", grad_out, args.samples)),
    }
    runnable = {name: (lambda fn=fn: (zero_grads(), fn())) for name, fn in entries.items() if not isinstance(fn, str)}
    times = time_round_robin(runnable, device, args.reps, warmup=2)
    results: dict[str, dict[str, float | str]] = {}
    for name, fn in entries.items():
        if isinstance(fn, str) or isinstance(times[name][0], str):
            results[name] = {"skipped": fn if isinstance(fn, str) else times[name][0]}
            continue
        ms = statistics.median(times[name])
        results[name] = {"ms": round(ms, 3), "tflops": round(flops / (ms * 1e-3) / 1e12, 4)}
    ms = {name: r["ms"] for name, r in results.items() if "ms" in r}
    ratios = {  # one run's medians
        f"{num}_over_{den}": round(ms[num] / ms[den], 3)
        for num, den in (
            ("dense_ceiling", "grouped_mm"),
            ("dense_ceiling", "triton"),
            ("dp_grouped_mm", "dp_sorted_loop"),
        )
        if num in ms and den in ms
    }

    print(
        json.dumps(
            {
                "bench": "moe_layer",
                "device": torch.cuda.get_device_name()
                if on_gpu
                else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                "dtype": str(dtype).removeprefix("torch."),
                "malloc": "reused" if reused else "default",
                "shape": {
                    "T": args.tokens,
                    "d": args.dim,
                    "f": args.hidden,
                    "E": args.experts,
                    "top_k": args.top_k,
                    "B": args.samples,
                },
                "expert_gflop_fwd_bwd": round(flops / 1e9, 3),
                "reps": args.reps,
                "results": results,
                "ratios": ratios,
            }
        )
    )


if __name__ == "__main__":
    main()
