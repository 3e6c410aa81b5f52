"""One fault scenario of bench/efficiency.py: a 4-bank secure-aggregation job, in process, with one fault.

    PYTHONPATH=<repo>:<repo>/tests/fl_server python bench/faults/scenario.py --scenario NAME --root DIR

Runs with whichever fedmoe PYTHONPATH names (bench/efficiency.py points it at the code before
pre-flight, then at the working tree) and that version's own in-process harness
(tests/fl_server/local_grid.py: fedmoe's real ClientApp behind a Grid that only replaces the wire).
Every fault is made here, never in fedmoe: a bank's policy file or data file, a small tmpfs as a
bank's state folder, a Grid that stops delivering to a killed bank or raises (like a SIGKILL) in the
server. Writes DIR/scenario.json (which fedmoe ran, the crash if any, wall time); the job's state is
DIR/server and DIR/banks, read by bench/efficiency.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from local_grid import LocalGrid

import fedmoe
from fedmoe.fl_server.ceremony import loopback_ceremony
from fedmoe.fl_server.console import SilentReporter
from fedmoe.fl_server.federation import Federation
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.messages import SecAggStage

JOB = "efficiency"
BANKS = 4  # the default threshold is 3 of 4: one faulty bank leaves a round its threshold, two do not
DISK_BYTES = 512 * 1024  # the full disk: room for keys and the data cache, not for a round's release
CRASH_STAGES = {"identify": SecAggStage.IDENTIFY, "share_keys": SecAggStage.SHARE_KEYS,
                "masked_input": SecAggStage.MASKED_INPUT, "unmask": SecAggStage.UNMASK}  # fmt: skip
FAULTS = ("refuse", "data", "disk", "kill-before-masked", "kill-after-masked", "crash")


def run_config(root: Path) -> dict:
    return {
        "job-id": JOB,
        "aggregation": "secagg",
        "num-rounds": 2,
        "min-banks": 3,  # the default: the banks' own floor of contributors
        "model-preset": "tiny",
        "local-steps": 2,
        "records-per-bank": 240,
        "synthetic-banks": 5,
        "seq-len": 48,
        "epsilon": 8.0,
        "evaluate": False,
        "round-timeout": 1.0,  # in-process replies are immediate: this is how long a silent bank costs
        "key-dir": str(root / "keys"),
        "server-state-dir": str(root / "server"),
        "bank-state-root": str(root / "banks"),
    }


def bank_nodes() -> dict[int, dict]:
    """Every bank under the strict default policy (no policy file), on its synthetic partition."""
    return {100 + i: {"bank-id": f"bank-{i}", "partition-id": i} for i in range(BANKS)}


def faulty_banks(count: int) -> list[str]:
    return [f"bank-{BANKS - 1 - i}" for i in range(count)]  # bank-3, then bank-2


# ---- faults at the banks -------------------------------------------------------------------------
def refusing_policy(root: Path, nodes: dict[int, dict], faulty: list[str]) -> None:
    """The bank's lifetime budget (epsilon 1) is below the job's 8: its policy refuses the job."""
    policy = root / "refusing-policy.toml"
    policy.write_text("# the strict defaults, with a lifetime budget below the job's\nepsilon = 1.0\n")
    for config in nodes.values():
        if config["bank-id"] in faulty:
            config["policy-file"] = str(policy)


def corrupt_data(root: Path, nodes: dict[int, dict], faulty: list[str]) -> None:
    """The bank's own data file: 200 good records, then a line cut off mid-write (not JSON)."""
    for config in nodes.values():
        if config["bank-id"] in faulty:
            path = root / f"data-{config['bank-id']}.jsonl"
            good = [json.dumps({"text": f"customer {i} paid invoice {1000 + i} on time."}) for i in range(200)]
            path.write_text("\n".join(good) + '\n{"text": "customer 200 paid inv\n')
            config["data-path"] = str(path)


def full_disks(root: Path, nodes: dict[int, dict], faulty: list[str]) -> list[Path]:
    """The bank's state folder on its own 512 KiB tmpfs: keys and the data cache fit, a round's
    replica and release do not (a real ENOSPC, a real statvfs). Needs mount (root)."""
    mounts = []
    for config in nodes.values():
        if config["bank-id"] in faulty:
            folder = root / "full-disk" / config["bank-id"]
            folder.mkdir(parents=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(folder)], check=True)
            mounts.append(folder)
            config["state-dir"] = str(folder)
    return mounts


def release_disks(root: Path, mounts: list[Path]) -> None:
    """Copies each full disk's bank state where efficiency.py reads banks, then unmounts it."""
    for folder in mounts:
        shutil.copytree(folder, root / "banks" / folder.name, dirs_exist_ok=True)
        subprocess.run(["umount", str(folder)], check=False)


# ---- faults on the wire and at the server ------------------------------------------------------
class KillingGrid(LocalGrid):
    """`victims` die in round 1, before their masked input (never get the request) or right after it
    (their reply arrives, then nothing more); a dead bank never answers again."""

    def __init__(self, node_configs, run_config, victims: list[int], after_masked: bool) -> None:
        super().__init__(node_configs, run_config)
        self.victims, self.after_masked = set(victims), after_masked
        self.dead: set[int] = set()

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # a push gives every message its id
            if is_stage(msg, SecAggStage.MASKED_INPUT, 1) and msg.metadata.dst_node_id in self.victims:
                if not self.after_masked:
                    self.dead.add(msg.metadata.dst_node_id)
        replies = super().send_and_receive([m for m in messages if m.metadata.dst_node_id not in self.dead])
        for msg in messages:
            if self.after_masked and is_stage(msg, SecAggStage.MASKED_INPUT, 1):
                self.dead |= {msg.metadata.dst_node_id} & self.victims
        return replies


class CrashingGrid(LocalGrid):
    """The server dies (like a SIGKILL) when round 1's `stage` replies are in, or, for "saved", at
    round 2's first message (round 1's record written)."""

    def __init__(self, node_configs, run_config, stage: str) -> None:
        super().__init__(node_configs, run_config)
        self.stage = stage

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if self.stage == "saved" and any(m.metadata.group_id.endswith("-r2") for m in messages):
            raise KeyboardInterrupt("server killed after round 1 was saved")
        replies = super().send_and_receive(messages, timeout=timeout)
        if self.stage != "saved" and any(is_stage(m, CRASH_STAGES[self.stage], 1) for m in messages):
            raise KeyboardInterrupt(f"server killed after round 1's {self.stage} replies")
        return replies


def is_stage(msg, stage: SecAggStage, round_idx: int) -> bool:
    return msg.metadata.message_type == stage.message_type and msg.metadata.group_id.endswith(f"-r{round_idx}")


# ---- the job -------------------------------------------------------------------------------------
def run(root: Path, fault: str, count: int, crash_stage: str) -> dict:
    loopback_ceremony(root / "keys", [f"bank-{i}" for i in range(BANKS)])
    config, nodes, faulty = run_config(root), bank_nodes(), faulty_banks(count)
    job = JobConfig.from_run_config(config)
    by_bank = {c["bank-id"]: node for node, c in nodes.items()}
    mounts: list[Path] = []
    grid: LocalGrid = LocalGrid(nodes, config)
    crash = ""
    if fault == "refuse":
        refusing_policy(root, nodes, faulty)
    elif fault == "data":
        corrupt_data(root, nodes, faulty)
    elif fault == "disk":
        mounts = full_disks(root, nodes, faulty)
    elif fault.startswith("kill"):
        grid = KillingGrid(nodes, config, [by_bank[b] for b in faulty], after_masked=fault == "kill-after-masked")
    elif fault == "crash":
        faulty = []
        try:
            Federation(grid=CrashingGrid(nodes, config, crash_stage), job=job, reporter=SilentReporter()).run()
        except KeyboardInterrupt as killed:
            crash = str(killed)
        grid = LocalGrid(nodes, config)  # the resubmitted job: the same job id, a fresh server process
    try:
        Federation(grid=grid, job=job, reporter=SilentReporter()).run()
    finally:
        release_disks(root, mounts)
    return {"faulty": faulty, "crash": crash}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fault", required=True, choices=FAULTS)
    p.add_argument("--count", type=int, default=1, help="how many banks have the fault (bank-3, then bank-2)")
    p.add_argument("--crash-stage", default="masked_input", choices=[*CRASH_STAGES, "saved"])
    p.add_argument("--root", type=Path, required=True)
    args = p.parse_args()
    args.root.mkdir(parents=True, exist_ok=False)
    started = time.perf_counter()
    result = {"fedmoe": str(Path(fedmoe.__file__).parents[1])}
    try:
        result |= run(args.root, args.fault, args.count, args.crash_stage)
    except Exception:  # the job itself failed: efficiency.py reports it with whatever state is left
        result["error"] = traceback.format_exc(limit=4)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    (args.root / "scenario.json").write_text(json.dumps(result))
    sys.exit(1 if "error" in result else 0)


if __name__ == "__main__":
    main()
