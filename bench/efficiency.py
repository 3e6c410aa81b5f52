"""ε efficiency under faults (issue 27): the ε each honest bank spent per round applied, before vs after pre-flight.

    .venv/bin/python bench/efficiency.py [--before d9446e0^] [--scenarios a1,a2,...] [--out runs/efficiency]

Runs each fault scenario twice, one after the other, in this run: with the code of `--before`
(checked out into a temporary git worktree: the parent of the first pre-flight commit) and with this
working tree. A scenario is one in-process secure-aggregation job (bench/faults/scenario.py: 4 banks,
threshold 3, the `tiny` preset, 2 rounds, 240 records of 48 tokens per bank, DP-SGD at epsilon 8)
run in a subprocess whose PYTHONPATH is that version (its fedmoe and its tests/fl_server harness).

Per bank, from its privacy ledger (banks/<bank>/privacy/*/ledger.jsonl, the entries of this job
with status "trained") and the server's state.json:

    ε spent           sum of epsilon_spent_this_round over its trained entries
    rounds applied    aggregated rounds it contributed to (its update is in the global model)
    ε per applied     ε spent / rounds applied ("inf" when it spent ε and nothing was applied)

Honest banks are the ones without the fault. Prints ONE JSON line: scenario -> before/after -> per
bank numbers, each round's record (aggregated, participants, outcomes, what the server wrote about
the banks left out and about a round without an aggregate).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "bench" / "faults" / "scenario.py"  # the working tree's, for both versions
JOB = "efficiency"
SPENT_NOTHING_APPLIED = "inf (ε spent, nothing applied)"

# name -> (what goes wrong, scenario.py arguments), in the order they run: two faulty banks of four
# leave a round below its threshold of 3 (where pre-flight matters), one leaves it its threshold
SCENARIOS = {
    "a2": ("two banks' policies refuse (lifetime epsilon 1 < the job's 8)", ["--fault", "refuse", "--count", "2"]),
    "a1": ("one bank's policy refuses", ["--fault", "refuse"]),
    "b2": ("a data error at two banks (their JSONL file has a cut-off line)", ["--fault", "data", "--count", "2"]),
    "e2": ("a disk error at two banks (each state folder on a full 512 KiB disk)", ["--fault", "disk", "--count",
                                                                                   "2"]),
    "c1": ("a bank killed before its masked input (round 1)", ["--fault", "kill-before-masked"]),
    "d1": ("a bank killed after its masked input (round 1)", ["--fault", "kill-after-masked"]),
    "f-masked_input": ("server crash after round 1's masked input, then resumed", ["--fault", "crash",
                                                                                  "--crash-stage", "masked_input"]),
    "f-saved": ("server crash after round 1 was saved, then resumed", ["--fault", "crash", "--crash-stage", "saved"]),
    "f-unmask": ("server crash after round 1's unmask, then resumed", ["--fault", "crash", "--crash-stage",
                                                                       "unmask"]),
    "f-share_keys": ("server crash after round 1's share-keys, then resumed", ["--fault", "crash",
                                                                              "--crash-stage", "share_keys"]),
    "f-identify": ("server crash after round 1's identify, then resumed", ["--fault", "crash", "--crash-stage",
                                                                           "identify"]),
    "b1": ("a data error at one bank", ["--fault", "data"]),
    "e1": ("a disk error at one bank", ["--fault", "disk"]),
    "c2": ("two banks killed before their masked input", ["--fault", "kill-before-masked", "--count", "2"]),
}  # fmt: skip


def run_scenario(repo: Path, name: str, root: Path) -> dict:
    """One scenario with the code in `repo`; what its ledgers and the server's state say."""
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'tests' / 'fl_server'}"}
    argv = [sys.executable, str(RUNNER), *SCENARIOS[name][1], "--root", str(root)]
    with open(root.with_suffix(".log"), "w") as log:
        subprocess.run(argv, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
    ran_path = root / "scenario.json"
    if not ran_path.exists():
        return {"error": f"the scenario left no scenario.json: see {root.with_suffix('.log')}"}
    ran = json.loads(ran_path.read_text())
    state_path = root / "server" / JOB / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"rounds": []}
    rounds = [round_record(r) for r in state["rounds"]]
    banks = {bank.name: bank_numbers(bank, rounds, ran["faulty"]) for bank in sorted((root / "banks").iterdir())}
    honest = [b["eps_per_applied_round"] for b in banks.values() if not b["faulty"]]
    out = {"fedmoe": ran["fedmoe"], "wall_s": ran["wall_s"], "honest_eps_per_applied_round": honest, "banks": banks,
           "rounds": rounds, "end_reason": state.get("end_reason", "")}  # fmt: skip
    for key in ("crash", "error"):
        if ran.get(key):
            out[key] = ran[key]
    return out


def round_record(r: dict) -> dict:
    keep = ("round", "aggregated", "participants", "outcomes", "left_out", "no_aggregate")
    return {k: r.get(k) for k in keep}


def bank_numbers(folder: Path, rounds: list[dict], faulty: list[str]) -> dict:
    trained = trained_entries(folder)
    spent = sum(e.get("epsilon_spent_this_round", e["epsilon"] - e.get("epsilon_before", 0.0)) for e in trained)
    applied = [r["round"] for r in rounds if r["aggregated"] and folder.name in r["participants"]]
    if applied:
        per_round: float | str | None = round(spent / len(applied), 3)
    else:
        per_round = SPENT_NOTHING_APPLIED if spent > 0 else None  # None: nothing spent, nothing applied
    model = folder / "jobs" / JOB / "state.json"
    return {
        "faulty": folder.name in faulty,
        "eps_spent": round(spent, 3),
        "trained_rounds": [e["round"] for e in trained],  # a round twice would be a bank training it twice
        "rounds_applied": applied,
        "eps_per_applied_round": per_round,
        "model_at_round": json.loads(model.read_text()).get("applied_round") if model.exists() else None,
    }


def trained_entries(folder: Path) -> list[dict]:
    entries = [json.loads(line) for path in sorted(folder.glob("privacy/*/ledger.jsonl"))
               for line in path.read_text().splitlines() if line.strip()]  # fmt: skip
    return [e for e in entries if e.get("job_id") == JOB and e.get("status") == "trained"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="d9446e0^", help="the commit to compare with ('' to skip)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "efficiency")
    p.add_argument("--table", type=Path, help="print the markdown table of a run's JSON line (a file) and stop")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    names = [n for n in args.scenarios.split(",") if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; expected some of {list(SCENARIOS)}")
    out = args.out.resolve()  # the `before` runs start in their own worktree: a relative path would land there
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"bench": "efficiency", "banks": 4, "threshold": 3, "rounds": 2, "before": args.before,
                    "scenarios": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fedmoe-before-") as tmp:
        worktree = Path(tmp) / "repo"
        if args.before:
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=REPO, check=True,
                           capture_output=True)  # fmt: skip
        try:
            for name in names:
                entry: dict = {"fault": SCENARIOS[name][0]}
                if args.before:
                    entry["before"] = run_scenario(worktree, name, out / name / "before")
                entry["after"] = run_scenario(REPO, name, out / name / "after")
                result["scenarios"][name] = entry
                print(f"{name}: {summary(entry)}", file=sys.stderr, flush=True)
                (out / "efficiency.json").write_text(json.dumps(result))  # so far: a cut-short run keeps them
        finally:
            if args.before:
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, capture_output=True)
    print(json.dumps(result))


def table(result: dict) -> str:
    """The markdown table of docs/reliability.md from one run's JSON."""
    header = ["scenario", "fault", "honest banks' ε per applied round, before", "after",
              "faulty banks' ε spent, before / after", "rounds aggregated, before / after",
              "what the server recorded after (round 1)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, entry in result["scenarios"].items():
        before, after = entry.get("before", {}), entry["after"]
        cells = [name, entry["fault"], per_round(before), per_round(after), faulty_spent(before) + " / "
                 + faulty_spent(after), aggregated(before) + " / " + aggregated(after), outcome(after)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_round(run: dict) -> str:
    if not run or "error" in run:
        return "n/a" + (f" ({run['error'].strip().splitlines()[-1]})" if run else "")
    shown = [shown_per_round(b) for b in run["banks"].values() if not b["faulty"]]
    return ", ".join(shown) if len(set(shown)) > 1 else f"{shown[0]} (each of {len(shown)})"


def shown_per_round(bank: dict) -> str:
    value = bank["eps_per_applied_round"]
    if value is None:
        return "nothing spent"
    if isinstance(value, str):
        return f"**inf** (ε {bank['eps_spent']:.2f} spent, nothing applied)"
    return f"{value:.3f}"


def faulty_spent(run: dict) -> str:
    spent = [f"{b['eps_spent']:.2f}" for b in run.get("banks", {}).values() if b["faulty"]]
    return ", ".join(spent) or "-"


def aggregated(run: dict) -> str:
    return "".join("Y" if r["aggregated"] else "n" for r in run.get("rounds", [])) or "-"


def outcome(run: dict, limit: int = 240) -> str:
    """Round 1's record: why it has no aggregate, or what it says of the faulty banks, or who contributed."""
    if not run.get("rounds"):
        return "n/a"
    first = run["rounds"][0]
    faulty = [b for b, numbers in run["banks"].items() if numbers["faulty"]]
    if first["no_aggregate"]:
        text = first["no_aggregate"]
    elif faulty:
        text = "; ".join(f"{b}: {first['left_out'].get(b, first['outcomes'].get(b, '?'))}" for b in faulty)
    else:
        text = "aggregated: " + ", ".join(f"{b} {o}" for b, o in first["outcomes"].items())
    text = text.replace("|", "/")
    return f"`{text}`" if len(text) <= limit else f"`{text[:limit]}`…"


def summary(entry: dict) -> str:
    return "; ".join(f"{v}: {entry[v].get('honest_eps_per_applied_round')}" for v in ("before", "after") if v in entry)


if __name__ == "__main__":
    main()
