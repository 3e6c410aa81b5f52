"""A bank exports the job's global model from its own state dir, without another training round.

After a job, every bank's replica holds the global model of the last aggregate it applied (the
server's closing message delivers the final one). This writes it in every form `fedmoe.model.export`
knows: merged (LoRA folded in, a Hugging Face folder), adapter (PEFT + the expert companion) and,
for a preset base, the base itself. Beside them, `optimizer.safetensors`: the update rule's state
(fedmoe.fl_client.fedopt: Adam's moments and step count after the last aggregate), so a follow-up
job can continue the same optimizer from the exported model.

    python -m fedmoe.fl_client.export --job-id demo \\
        --node-config "bank-id='bank-0' state-dir='runs/demo/banks/bank-0'" --out runs/demo/final \\
        [--prompt TEXT ... [--compare-bank NODE-CONFIG ...] [--check-transformers]] [--trace-held-out N]

The job is the bank's own record of it, `<state-dir>/jobs/<job-id>/job.json` (fedmoe.fl_client.bank.
record_job: written by the bank from the run config it took part under, so no server file is needed).
`--job FILE` (a job.json or TOML run config) may be given instead; where the bank has a record of that
job, the file must agree with it (but for the keys a resubmission may change: num-rounds, round-timeout,
rejoin-grace). `--node-config` defaults to $FEDMOE_NODE_CONFIG, the bank executor's own.

The export always starts from the fp32 base (a job with `base-precision = "int8"` trained over an
int8 copy of it; the trained factors are the same). The options show what fine-tuning did:
`--prompt`: greedy continuations before (the job's starting model, the same at every bank) and after
(this bank's replica, and each `--compare-bank`'s: one global model, so identical replicas are
decoded once and named); `--check-transformers`: transformers reads the merged folder, names its
class and decodes the same prompts, which must give the same tokens (exit 1 otherwise);
`--trace-held-out N`: the expert trace of this bank's first N held-out records before and after,
as `<out>/expert_trace.png` (fedmoe.model.trace.write_heatmap_pair) and two summaries.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import tomllib
from pathlib import Path

import torch

from fedmoe.fl_client.bank import Bank, job_changes, job_record_path, read_job_record
from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.executor import NODE_CONFIG_ENV
from fedmoe.fl_client.state import atomic_save_tensors, load_tensors
from fedmoe.fl_client.task import load_bank_data
from fedmoe.model.export import export_job, greedy_continuations, transformers_greedy
from fedmoe.model.tokenizer import load_tokenizer
from fedmoe.model.trace import ExpertTracer, write_heatmap_pair
from fedmoe.model.trainable import TrainableView
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


def export_job_config(node_config: dict, job_id: str, job_file: Path | None) -> JobConfig:
    """The job to export: the bank's own record of `job_id`, or `job_file` checked against that record.

    Raises:
        ConfigError: neither given, no 'state-dir' to find the record in, no record, or a file that
            differs from the bank's record.
    """
    state_dir = node_config.get("state-dir")
    if job_file is None:
        if not job_id or not state_dir:
            raise ConfigError(
                "the job: give --job-id ID with a node-config that has 'state-dir' (the bank's own record, "
                f"<state-dir>/jobs/ID/job.json), or --job FILE; got job-id {job_id!r}, state-dir {state_dir!r}"
            )
        return read_job_record(job_record_path(Path(state_dir), job_id))
    job = read_job(job_file)
    if job_id and job_id != job.job_id:
        raise ConfigError(f"{job_file}: job-id {job.job_id!r}, but --job-id is {job_id!r}")
    record = job_record_path(Path(state_dir), job.job_id) if state_dir else None
    if record is not None and record.exists():
        changed = job_changes(read_job_record(record), job)
        if changed:
            raise ConfigError(f"{job_file}: not the job this bank took part in ({record}): {changed}")
    return job


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedmoe.fl_client.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-id", default="", help="the job, read from the bank's own record of it")
    parser.add_argument("--job", type=Path, help="a run config file instead (job.json or TOML)")
    parser.add_argument(
        "--node-config",
        default=os.environ.get(NODE_CONFIG_ENV, ""),
        help=f"the bank's node-config (bank-id, state-dir, ...) [${NODE_CONFIG_ENV}]",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write merged/, adapter/, base/")
    parser.add_argument("--prompt", action="append", default=[], help="continue TEXT before and after (repeat)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="greedy tokens per prompt [24]")
    parser.add_argument(
        "--compare-bank", action="append", default=[], metavar="NODE-CONFIG", help="another bank's replica (repeat)"
    )
    parser.add_argument("--check-transformers", action="store_true", help="transformers must decode the same tokens")
    parser.add_argument("--trace-held-out", type=int, default=0, metavar="N", help="expert trace of N held-out records")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if not args.node_config.strip():
            raise ConfigError(f"the bank: give --node-config (bank-id, state-dir, ...) or set ${NODE_CONFIG_ENV}")
        node_config = parse_node_config(args.node_config)
        job = export_job_config(node_config, args.job_id, args.job)
        job = dataclasses.replace(job, base_precision="fp32")  # export from the fp32 base
        bank = Bank(job, BankConfig.from_node_config(node_config, job))
        others = [BankConfig.from_node_config(parse_node_config(text), job) for text in args.compare_bank]
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
    try:
        return _show(args, bank, others, written["merged"])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _show(args: argparse.Namespace, bank: Bank, others: list[BankConfig], merged: Path) -> int:
    """The optional before/after views: continuations, transformers' reading, expert trace."""
    if not (args.prompt or args.trace_held_out):
        return 0
    replica = bank.view.flatten()
    start = start_flat(bank)
    status = 0
    if args.prompt:
        tokenizer = load_tokenizer(bank.job.base_checkpoint or None, eos_id=bank.model.config.eos_token_id)
        prompts = [tokenizer.encode(p) for p in args.prompt]
        ours = show_continuations(bank, others, start, replica, prompts, args, tokenizer)
        if args.check_transformers:
            status = check_transformers(merged, prompts, ours, args.max_new_tokens, tokenizer)
    if args.trace_held_out:
        trace_held_out(bank, start, replica, args.trace_held_out, args.out)
    bank.view.load_flat_(replica)
    return status


def start_flat(bank: Bank) -> torch.Tensor:
    """The trainable values every bank started the job from, checked against the bank's record of them.

    FFA-LoRA trains only B, zero at the start; any other mode starts from the base's own values.
    """
    if bank.job.train_mode == "lora":
        start = torch.zeros(bank.view.numel)
    else:
        from fedmoe.fl_client.task import build_model

        start = TrainableView(build_model(bank.job)).flatten()
    found = hashlib.sha256(start.numpy().tobytes()).hexdigest()
    if found != bank.state.start_hash:
        raise ConfigError(
            f"{bank.state_file}: start_hash {bank.state.start_hash[:16]}... does not match the job's starting "
            f"model ({found[:16]}...): cannot show 'before'"
        )
    return start


def replica_flat(view: TrainableView, config: BankConfig, job: JobConfig) -> torch.Tensor:
    """Another bank's replica as a flat vector in `view`'s order."""
    path = config.job_dir(job.job_id) / "replica.safetensors"
    if not path.exists():
        raise ConfigError(f"{path}: no replica; did {config.bank_id} take part in job {job.job_id!r}?")
    saved = load_tensors(path)
    missing = [spec.name for spec in view.specs if spec.name not in saved]
    if missing:
        raise ConfigError(f"{path}: expected the job's trainable tensors, missing {missing[0]} (+{len(missing) - 1})")
    return torch.cat([saved[spec.name].reshape(-1).float() for spec in view.specs])


def show_continuations(bank, others, start, replica, prompts, args, tokenizer) -> list[list[int]]:
    """Prints each prompt's greedy continuation before and after, per bank; returns this bank's after."""
    view, n = bank.view, args.max_new_tokens
    eos = tokenizer.eos_id
    view.load_flat_(start)
    before = greedy_continuations(bank.model, prompts, n, eos)
    flats = {bank.config.bank_id: replica} | {c.bank_id: replica_flat(view, c, bank.job) for c in others}
    decoded: dict[str, tuple[str, list[list[int]]]] = {}  # replica hash -> (first bank, continuations)
    after: dict[str, list[list[int]]] = {}
    for bank_id, flat in flats.items():
        digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
        if digest not in decoded:
            view.load_flat_(flat)
            decoded[digest] = (bank_id, greedy_continuations(bank.model, prompts, n, eos))
        after[bank_id] = decoded[digest][1]
        first = decoded[digest][0]
        same = f" (= {first}'s replica, bit for bit)" if first != bank_id else ""
        print(f"{bank_id}: replica after round {bank.state.applied_round}, sha256 {digest[:16]}{same}")
    for i, text in enumerate(args.prompt):
        print(f"prompt {text!r}")
        print(f"  before (every bank): {text + tokenizer.decode(before[i])!r}")
        for bank_id in flats:
            print(f"  after  {bank_id:<12}: {text + tokenizer.decode(after[bank_id][i])!r}")
    return after[bank.config.bank_id]


def check_transformers(merged: Path, prompts, ours, max_new_tokens: int, tokenizer) -> int:
    """transformers reads the merged folder and must decode the prompts to our tokens (1 if not)."""
    name, theirs = transformers_greedy(merged, prompts, max_new_tokens, tokenizer.eos_id)
    print(f"transformers reads {merged} as {name}")
    status = 0
    for a, b in zip(ours, theirs, strict=True):
        if a == b:
            verdict = f"the same {len(b)} tokens as ours"
        else:
            status = 1
            first = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            verdict = f"NOT our tokens: first difference at new token {first}"
        print(f"  {name} generates: {tokenizer.decode(b)!r} ({verdict})")
    return status


def trace_held_out(bank: Bank, start: torch.Tensor, replica: torch.Tensor, n: int, out: Path) -> Path:
    """Expert load of the bank's first n held-out records before and after, side by side (PNG + summaries)."""
    data = load_bank_data(bank.job, bank.config, bank.model.config.vocab_size).held_out
    inputs_BT = data.inputs[:n]
    valid_BT = torch.arange(inputs_BT.shape[1]) < data.lengths[:n, None]  # real tokens; right padding is not counted
    tracers = []
    for name, flat in (("before", start), ("after", replica)):
        bank.view.load_flat_(flat)
        tracer = ExpertTracer(bank.model, None)
        tracer.set_context(inputs_BT, 0, valid_BT=valid_BT)  # causal: padding on the right changes no real token
        with tracer, torch.no_grad():
            bank.model.eval()(inputs_BT)
        tracer.write_summary(out / f"expert_summary_{name}.json")
        tracers.append(tracer)
    title = f"{bank.config.bank_id}: {len(inputs_BT)} held-out records, before vs after job {bank.job.job_id}"
    path = write_heatmap_pair(tracers[0], tracers[1], out / "expert_trace.png", title=title)
    moved = int((tracers[1].counts_LE - tracers[0].counts_LE).abs().sum()) // 2
    pairs = int(tracers[0].counts_LE.sum())
    print(
        f"expert trace: {path} ({tracers[0].tokens} tokens; net {moved} of {pairs} (token, slot) pairs changed expert)"
    )
    return path


if __name__ == "__main__":
    raise SystemExit(main())
