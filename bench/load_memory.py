"""Peak memory of loading a bf16 checkpoint, old loader vs new, in one run; print one JSON line.

The checkpoint (default ~0.75 GB bf16, per-expert keys as on the hub, 4 shards) is written to a
temp folder, then each loader runs in its own fresh subprocess (so neither sees the other's
memory) and reports:
    baseline_rss_mb   VmRSS after `import torch, model` and before loading
    peak_rss_mb       VmHWM (the process's peak RSS) after loading
    load_over_size    (peak - baseline) / checkpoint bytes   <- the number the issue bounds (~1.3x)
    peak_over_size    peak / checkpoint bytes (includes the interpreter and torch itself)
Loaders:
    old          fedmoe/model/checkpoint.py as of commit OLD_COMMIT (git show), imported from a temp file:
                 read every tensor, stack experts, build a random fp32 model, cast, copy
    new          fedmoe.model.checkpoint.load_pretrained(dtype=bf16): headers first, meta-device model,
                 tensor-by-tensor reads into final storage
    transformers AutoModelForCausalLM.from_pretrained(dtype=bf16) (only with --transformers)
Both our loaders must produce the same weights (sha256 over the state dict, compared).

Run: python bench/load_memory.py [--size-mb 750] [--transformers] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the last model/checkpoint.py before the meta loader (the tree had no fedmoe/ namespace then)
OLD_COMMIT = "bfc5b03e3e4400f61da8d079848689793339ac58"


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def make_checkpoint(out_dir: Path, size_mb: int) -> int:
    """Random bf16 weights with a DeepSeek-V3 layout; experts sized to reach size_mb."""
    import torch

    from fedmoe.model.checkpoint import base_state_dict, write_checkpoint
    from fedmoe.model.deepseek import DeepseekForCausalLM, preset

    D, F, E = 1024, 512, 32  # one MoE layer's experts: 3 * D * F * E * 2 bytes ~ 100 MB
    per_layer = 3 * D * F * E * 2
    L = max(2, round(size_mb * 1024**2 * 0.85 / per_layer) + 1)
    # the small preset's V3 layout (sigmoid routing, groups, shared expert), widened to D and E
    config = preset(
        "small", vocab_size=32000, hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_hidden_layers=L
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in base_state_dict(DeepseekForCausalLM(config)).items()}
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        router = key.endswith("mlp.gate.weight") or key.endswith("e_score_correction_bias")
        state[key] = (torch.randn(shape, generator=gen) * 0.02).to(torch.float32 if router else torch.bfloat16)
    write_checkpoint(config, state, out_dir, dtype=torch.bfloat16, max_shard_bytes=256 * 1024**2)
    return sum(t.numel() * t.element_size() for t in state.values())


def child(loader: str, ckpt: Path, old_module: Path | None) -> None:
    """Runs in a fresh process: load once, report memory (and a hash of what was loaded)."""
    import torch

    import fedmoe.model.checkpoint  # noqa: F401  (counted in the baseline, like the imports of a real caller)

    if loader == "transformers":
        import transformers  # noqa: F401
    baseline = _status_mb("VmRSS")
    started = time.perf_counter()
    if loader == "new":
        from fedmoe.model.checkpoint import load_pretrained

        loaded = load_pretrained(ckpt, dtype=torch.bfloat16)
    elif loader == "old":
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_checkpoint", old_module)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        loaded = old.load_pretrained(ckpt, dtype=torch.bfloat16)
    else:
        import transformers

        loaded = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    seconds = time.perf_counter() - started
    peak = _status_mb("VmHWM")
    digest = None
    if loader != "transformers":
        h = hashlib.sha256()
        for key, tensor in sorted(loaded.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        digest = h.hexdigest()
    out = {"baseline_rss_mb": baseline, "peak_rss_mb": peak, "seconds": seconds, "sha256": digest}
    sys.stdout.write(json.dumps(out) + "\n")


def run_child(loader: str, ckpt: Path, old_module: Path, size: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", loader, str(ckpt), str(old_module)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{loader} loader failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = size / 1024**2
    r["load_over_size"] = round((r["peak_rss_mb"] - r["baseline_rss_mb"]) / mb, 3)
    r["peak_over_size"] = round(r["peak_rss_mb"] / mb, 3)
    r["baseline_rss_mb"], r["peak_rss_mb"], r["seconds"] = (
        round(r["baseline_rss_mb"], 1),
        round(r["peak_rss_mb"], 1),
        round(r["seconds"], 2),
    )
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=int, default=750, help="approximate checkpoint size [750]")
    p.add_argument("--transformers", action="store_true", help="also measure transformers' from_pretrained")
    p.add_argument("--keep", type=Path, help="write the checkpoint here and keep it (default: a temp folder)")
    p.add_argument("--child", nargs=3, metavar=("LOADER", "CKPT", "OLD_MODULE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return

    with tempfile.TemporaryDirectory(prefix="fedmoe-load-bench-") as tmp:
        ckpt = args.keep or Path(tmp) / "ckpt"
        size = make_checkpoint(ckpt, args.size_mb)
        old_module = Path(tmp) / "old_checkpoint.py"
        source = subprocess.run(
            ["git", "show", f"{OLD_COMMIT}:model/checkpoint.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        old_module.write_text(source, encoding="utf-8")
        results = {"old": run_child("old", ckpt, old_module, size), "new": run_child("new", ckpt, old_module, size)}
        if args.transformers:
            results["transformers"] = run_child("transformers", ckpt, old_module, size)
    same = results["old"].pop("sha256") == results["new"].pop("sha256")
    results.get("transformers", {}).pop("sha256", None)
    line = {
        "bench": "load_memory",
        "checkpoint_mb": round(size / 1024**2, 1),
        "dtype": "bf16",
        "shards": 1 + size // (256 * 1024**2),
        **results,
        "old_over_new_load": round(results["old"]["load_over_size"] / results["new"]["load_over_size"], 2),
        "same_weights": same,
        "torch": __import__("torch").__version__,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
