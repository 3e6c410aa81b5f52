"""How a round scales with the number of banks: wall time, the server's own time, bank memory.

    .venv/bin/python bench/scale.py --mode simulation --banks 3,15,50,100 --preset tiny
    .venv/bin/python bench/scale.py --mode loopback --banks 15 --preset small --rounds 2

For each federation size: one job (DP-SGD, secure aggregation: the defaults) on this machine,
either simulated inside the SuperLink (Flower's Ray backend) or as a real loopback deployment
(a SuperNode + executor per bank). From the server's state.json, per round:
    wall_s        the round's wall time
    server_s      the server's own compute (ServerSecAgg steps: key routing, share checks, summing
                  the BFV ciphertexts, removing the masks; CKKS: adding ciphertexts)
    bank_max_s    the slowest bank's training + sealing
    stages_s      secure aggregation: each Flower exchange's wall time (identify, advertise, share_keys,
                  masked_input, consistency, unmask; "-ahead" = done with the previous round's exchanges)
and per job: the largest RSS any bank process reached (sampled from /proc every 0.5 s: a bank's warm
executor, fedmoe-superexec, in the loopback deployment, a Ray ClientApp actor, which runs many banks, in simulation;
banks do not report it: it grows with their dataset).
Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class PeakRss(threading.Thread):
    """The largest RSS (MB) of any process whose command line contains one of `markers`."""

    def __init__(self, markers: tuple[bytes, ...]) -> None:
        super().__init__(daemon=True)
        self.markers, self.peak_mb, self.done = markers, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    if any(m in (proc / "cmdline").read_bytes() for m in self.markers):
                        status = (proc / "status").read_text().splitlines()
                        kb = next(line for line in status if line.startswith("VmRSS"))
                        self.peak_mb = max(self.peak_mb, int(kb.split()[1]) / 1024)
                except (OSError, StopIteration):
                    continue


def job_max_banks(banks: int, run_config: str) -> str:
    """`max-banks=<banks>` past the job's default 64 (a bank rejects an aggregate of more contributors than
    its job's max-banks), unless the caller set max-banks itself."""
    if banks <= 64 or "max-banks" in run_config:
        return ""
    return f" max-banks={banks}"


def run_job(banks: int, args: argparse.Namespace, root: Path) -> tuple[float, int]:
    run_config = (
        f'job-id="scale" num-rounds={args.rounds} model-preset="{args.preset}" train-mode="lora" '
        f"local-steps={args.local_steps} records-per-bank={args.records} min-banks=3 "
        f"round-timeout={args.round_timeout} {args.run_config}"
    ) + job_max_banks(banks, args.run_config)
    argv = [sys.executable, "-m", "fedmoe.fl_server.launch", "--banks", str(banks), "--root", str(root)]
    argv += ["--port", str(args.port), "--run-config", run_config]
    if args.mode == "simulation":
        argv.append("--simulation")
    shutil.rmtree(root, ignore_errors=True)
    sampler = PeakRss((b"fedmoe-superexec", b"flwr-clientapp", b"ClientAppActor"))
    sampler.start()
    started = time.perf_counter()
    with open(root.parent / f"{root.name}.log", "w") as log:
        rc = subprocess.run(argv, cwd=REPO, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT).returncode
    sampler.done.set()
    args.peak_mb = round(sampler.peak_mb)
    return time.perf_counter() - started, rc


def rounds_of(root: Path) -> list[dict]:
    state = json.loads((root / "server" / "scale" / "state.json").read_text())
    out = []
    for r in state["rounds"]:
        metrics = list(r["train_metrics"].values())
        out.append({
            "round": r["round"],
            "aggregated": r["aggregated"],
            "contributors": len(r["participants"]),
            "wall_s": round(r["seconds"].get("round", 0.0), 1),
            "server_s": round(r["seconds"].get("aggregate", 0.0), 2),
            "stages_s": {k.removeprefix("secagg-"): round(v, 1) for k, v in r["seconds"].items()
                         if k.startswith("secagg-")},
            "bank_max_s": round(max((m.get("seconds-train", 0) + m.get("seconds-encrypt", 0) for m in metrics),
                                    default=0.0), 1),
        })  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["simulation", "loopback"], default="simulation")
    p.add_argument("--banks", default="3,15,50,100", help="comma-separated federation sizes")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--records", type=int, default=400, help="records per bank")
    p.add_argument("--port", type=int, default=8600)
    p.add_argument("--round-timeout", type=float, default=1200.0, help="seconds a stage waits for the banks")
    p.add_argument("--run-config", default="", help='more run-config overrides, e.g. aggregation="ckks" max-banks=128')
    p.add_argument("--out", type=Path, default=REPO / "runs" / "scale")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for banks in (int(b) for b in args.banks.split(",")):
        root = args.out / f"{args.mode}-{banks}"
        wall, rc = run_job(banks, args, root)
        entry = {"banks": banks, "rc": rc, "job_wall_s": round(wall, 1), "bank_process_peak_mb": args.peak_mb}
        if (root / "server" / "scale" / "state.json").exists():
            entry["rounds"] = rounds_of(root)
        results.append(entry)
        print(f"{banks} banks: rc {rc}, {wall:.0f} s ({root}.log)", file=sys.stderr)
    print(json.dumps({"bench": "scale", "mode": args.mode, "preset": args.preset, "results": results}))


if __name__ == "__main__":
    main()
