"""A bank exports the job's global model from its own state dir, without another training round.

After a job, every bank's replica holds the global model of the last aggregate it applied (the
server's closing message delivers the final one). This writes it in every form `fedmoe.model.export`
knows: merged (LoRA folded in, a Hugging Face folder), adapter (PEFT + the expert companion) and,
for a preset base, the base itself. Beside them, `optimizer.safetensors`: the update rule's state
(fedmoe.fl_client.fedopt: Adam's moments and step count after the last aggregate), so a follow-up
job can continue the same optimizer from the exported model.

    python -m fedmoe.fl_client.export --job runs/demo/server/demo/job.json \\
        --node-config "bank-id='bank-0' state-dir='runs/demo/banks/bank-0'" --out runs/demo/final
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from fedmoe.fl_client.bank import Bank
from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.state import atomic_save_tensors
from fedmoe.model.export import export_job
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.errors import ConfigError
from fedmoe.protocol.files import read_document


def read_job(path: Path) -> JobConfig:
    """A run config as JSON (the server's job.json) or TOML (`key = value` lines)."""
    raw = read_document(path, ConfigError, fmt="json" if path.suffix == ".json" else "toml", where=f"run config {path}")
    return JobConfig.from_run_config(raw)


def parse_node_config(text: str) -> dict:
    """Flower's node-config syntax: space-separated key=value with TOML values."""
    return tomllib.loads("\n".join(text.split()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmoe.fl_client.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=Path, required=True, help="the job's run config (job.json or TOML)")
    parser.add_argument("--node-config", required=True, help="the bank's node-config (bank-id, state-dir, ...)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write merged/, adapter/, base/")
    args = parser.parse_args(argv)
    try:
        job = read_job(args.job)
        bank = Bank(job, BankConfig.from_node_config(parse_node_config(args.node_config), job))
    except (ConfigError, OSError, tomllib.TOMLDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not bank.replica_file.exists():
        print(
            f"error: {bank.replica_file}: no replica; did this bank take part in job {job.job_id!r}?", file=sys.stderr
        )
        return 2
    written = export_job(bank.model, args.out, base_dir=job.base_checkpoint or None, seed=job.seed)
    if bank.optimizer.stateful:
        meta = {"update_rule": job.update_rule, "applied_round": str(bank.state.applied_round)}
        tensors = bank.optimizer_state.to_tensors()
        written["optimizer"] = atomic_save_tensors(args.out / "optimizer.safetensors", tensors, metadata=meta)
    print(f"job {job.job_id}, bank {bank.config.bank_id}: global model after round {bank.state.applied_round}")
    for form, path in written.items():
        print(f"  {form}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
