"""Framework overhead per round on the loopback deployment: what a round costs beyond the banks' work.

    .venv/bin/python bench/overhead.py [--banks 3] [--rounds 3] [--before b49ebfc] [--aggregation secagg]

Runs the same job twice, one after the other, in this run: with the code of `--before` (checked out
into a temporary git worktree: today's code before the round-trip work) and with this working
tree. Each is a real loopback deployment (SuperLink, SuperNodes, executors on 127.0.0.1) of
`--banks` banks, the `tiny` preset, FFA-LoRA, DP-SGD, the job's aggregation (secure aggregation by
default), every bank under that version's deploy/demo-bank-policy.toml (it releases its losses, so evaluation
runs). Per round, from the server's state.json:

    overhead = round wall time - max over banks (seconds-train + seconds-encrypt)

the definition of issue 16 (everything that is not the slowest bank's training and sealing:
polling, start-up and imports, the secure-aggregation stages, server
aggregation, evaluation). Prints ONE JSON line: per-round overheads and their mean for both
versions, the ratio after/before, and the job wall times. The machine is noisy: only the ratio
measured in one run means much.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLICY = Path("deploy") / "demo-bank-policy.toml"  # each version's own (older code rejects newer policy keys)


def run_job(repo: Path, root: Path, banks: int, rounds: int, aggregation: str, port: int) -> float:
    """One loopback job with the code in `repo`; its wall time in seconds."""
    run_config = (
        f'job-id="overhead" num-rounds={rounds} model-preset="tiny" train-mode="lora" local-steps=5 '
        f'records-per-bank=400 aggregation="{aggregation}" round-timeout=600.0'
    )
    argv = [sys.executable, "-m", "fedmoe.fl_server.launch", "--banks", str(banks), "--root", str(root)]
    argv += ["--port", str(port), "--run-config", run_config]
    for i in range(banks):
        argv += ["--policy", f"bank-{i}={repo / POLICY}"]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        tail = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        raise SystemExit(f"job in {repo} failed (rc {result.returncode}):\n{tail}")
    return time.perf_counter() - started


def overheads(root: Path) -> list[dict[str, float]]:
    state = json.loads((root / "server" / "overhead" / "state.json").read_text())
    out = []
    for record in state["rounds"]:
        busiest = max(
            m.get("seconds-train", 0.0) + m.get("seconds-encrypt", 0.0) for m in record["train_metrics"].values()
        )
        wall = record["seconds"]["round"]
        out.append({"round": record["round"], "wall_s": round(wall, 2), "bank_s": round(busiest, 2),
                    "overhead_s": round(wall - busiest, 2)})  # fmt: skip
    return out


def measure(repo: Path, root: Path, args: argparse.Namespace, port: int) -> dict:
    shutil.rmtree(root, ignore_errors=True)  # a fresh job: an existing one would resume
    wall = run_job(repo, root, args.banks, args.rounds, args.aggregation, port)
    rounds = overheads(root)
    mean = sum(r["overhead_s"] for r in rounds) / len(rounds)
    return {"job_wall_s": round(wall, 1), "rounds": rounds, "mean_overhead_s": round(mean, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--banks", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--before", default="b49ebfc", help="the commit to compare with ('' to skip)")
    p.add_argument("--aggregation", default="secagg", choices=["secagg", "ckks"])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "overhead")
    args = p.parse_args()
    args.out = args.out.resolve()  # the `before` job runs in its own worktree: a relative path would land there
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"bench": "overhead", "banks": args.banks, "rounds": args.rounds, "aggregation": args.aggregation}
    if args.before:
        with tempfile.TemporaryDirectory(prefix="fedmoe-before-") as tmp:
            worktree = Path(tmp) / "repo"
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=REPO, check=True,
                           capture_output=True)  # fmt: skip
            try:
                result["before"] = {"commit": args.before, **measure(worktree, args.out / "before", args, 8200)}
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, capture_output=True)
    result["after"] = {"commit": "working tree", **measure(REPO, args.out / "after", args, 8300)}
    if args.before:
        ratio = result["after"]["mean_overhead_s"] / result["before"]["mean_overhead_s"]
        result["ratio_after_before"] = round(ratio, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
