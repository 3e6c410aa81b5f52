"""The measurement a consortium decides on: per bank, is federating better than training alone?

    .venv/bin/python bench/utility.py [--corpus consortium|locales] [--banks 3,5,10,15] [--steps 30] ...
    make experiment

Arms, for every bank i (banks 0..N-1 form the federation of N; banks 0..2 are in every one):
    alone       DP at epsilon per bank on its own data: the job's round with one member (local DP-SGD
                step, the update rule on its own update), the same steps, its lr tuned per bank;
    fed N       DP-FedSGD federations of N = 3, 5, 10, 15: each member's clipped, noised update of
                `local-steps` SGD steps, clamped; the mean; the update rule (Adam) applied to it,
                the same steps and epsilon per bank; one lr per federation (the consortium's choice);
    own         non-private AdamW on the bank's own data, the same steps and batch (reference);
    pooled N    non-private AdamW on the union of banks 0..N-1 with the federation's compute
                (batch N x B, the same steps): the reference a federation of N could at best reach.
Tuning: every arm gets the same lr grid (`--lr-grid`, --plain-lr-grid for the non-private arms),
trained on the train split with the first seed and scored on a validation split; the chosen lr
then runs with every seed (`--seeds`) and is scored on the held-out split (>= 200 records per
bank). Results: per bank and arm the mean and spread (max - min over seeds) of the held-out loss
and, on the consortium corpus, next-field accuracy (the category the model completes exactly,
fedmoe.fl_client.train.evaluate_task), and which arm each bank should pick.

The round is the production round's arithmetic in-process (no Flower, no encryption): members run
`fedmoe.fl_client.dp.train_private_round` (Poisson sampling, per-sample clipping, Gaussian noise, the
PRV accountant calibrating sigma for the planned steps) with the bank's DP config
(`fedmoe.fl_client.fedopt.local_dp_config`), clamp (`update_clamp`), the mean is applied with
`fedopt.fed_step`, exactly what every bank does with the decrypted mean (bank.apply_mean_delta).
Noise is seeded (secure-mode=false) for reproducibility. The data split is fixed (`--data-seed`);
a seed changes the model init, the batches and the noise.

A bench-only shortcut that changes no number: every bank has the same plan (n, q, sigma, steps),
so the accountant's pure functions are memoized per plan (the PRV search takes seconds).

Corpora: `consortium` (fedmoe.fl_client.data.consortium: one language, one market, banks differ in
product mix, segments and rare own patterns: the case the seed describes) and `locales` (the
8-locale corpus of fedmoe.fl_client.data.synthetic: the hard case; no task field there).
Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedmoe.fl_client.dp.accountant as accountant_module  # noqa: E402
import fedmoe.fl_client.dp.trainer as trainer_module  # noqa: E402
from fedmoe.fl_client.config import BankConfig  # noqa: E402
from fedmoe.fl_client.data import generate_bank_corpus, make_bank_profiles, pack_records, train_eval_split  # noqa: E402
from fedmoe.fl_client.data.consortium import field_spans, generate_consortium_corpus, make_consortium  # noqa: E402
from fedmoe.fl_client.data.packing import PackedData  # noqa: E402
from fedmoe.fl_client.dp import train_private_round  # noqa: E402
from fedmoe.fl_client.dp.accountant import AccountantState  # noqa: E402
from fedmoe.fl_client.fedopt import FedOptimizer, FedOptState, fed_step, local_dp_config, update_clamp  # noqa: E402
from fedmoe.fl_client.task import build_model, dp_config, round_seed  # noqa: E402
from fedmoe.fl_client.train import TaskScore, TrainConfig, evaluate_task, train_local  # noqa: E402
from fedmoe.model.tokenizer import load_tokenizer  # noqa: E402
from fedmoe.model.trainable import TrainableView  # noqa: E402
from fedmoe.protocol.config import JobConfig  # noqa: E402

logger = logging.getLogger("bench.utility")


@dataclass(frozen=True)
class Options:
    corpus: str = "consortium"
    preset: str = "tiny"
    train_mode: str = "full"
    banks: tuple[int, ...] = (3, 5, 10, 15)
    steps: int = 20  # DP steps per bank (= rounds x local steps), and non-private steps
    local_steps: int = 1  # K
    batch: int = 32  # expected Poisson batch (DP); per bank in the pooled reference
    records_per_bank: int = 700
    held_out: int = 200
    validation: int = 100
    seq_len: int = 96
    update_rule: str = "adam"
    local_lr: float = 1.0
    lr_grid: tuple[float, ...] = (0.01, 0.03)
    plain_lr_grid: tuple[float, ...] = (0.01, 0.03)
    epsilon: float = 8.0
    delta: float = 1e-5
    clip_norm: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0

    def job(self, *, lr: float, seed: int) -> JobConfig:
        return JobConfig(
            job_id="utility",
            num_rounds=self.steps // self.local_steps,
            seed=seed,
            model_preset=self.preset,
            train_mode=self.train_mode,
            seq_len=self.seq_len,
            update_rule=self.update_rule,
            local_steps=self.local_steps,
            local_lr=self.local_lr,
            lr=lr,
            batch_size=self.batch,
            epsilon=self.epsilon,
            delta=self.delta,
            clip_norm=self.clip_norm,
            secure_mode=False,  # seeded noise: reproducible comparison (shipped runs: CSPRNG)
        )


@dataclass
class Split:
    """One bank's data: train (what it trains on), validation (tuning), held-out (the result)."""

    source: str
    train: PackedData
    validation: PackedData
    held_out: PackedData
    validation_spans: list[tuple[int, int]] | None
    held_out_spans: list[tuple[int, int]] | None


@dataclass
class Scores:
    validation: TaskScore
    held_out: TaskScore


# ---- data -------------------------------------------------------------------------------------------


def bank_records(opts: Options, n_banks: int) -> list[tuple[str, list[dict]]]:
    """(source, records) per bank; bank i is the same records in every federation."""
    n, seed = opts.records_per_bank, opts.data_seed
    if opts.corpus == "consortium":
        banks = make_consortium(n_banks, seed)
        return [(f"consortium {b.bank_id}", generate_consortium_corpus(b, n, seed)) for b in banks]
    profiles = make_bank_profiles(n_banks, seed=seed)
    return [(f"{p.bank_id} ({p.locale})", generate_bank_corpus(p, n, seed=seed)) for p in profiles]


def split_bank(opts: Options, source: str, records: list[dict]) -> Split:
    tok = load_tokenizer(None)
    rest, held_out = train_eval_split(records, eval_fraction=opts.held_out / len(records), seed=opts.data_seed,
                                      privacy_unit="record")  # fmt: skip
    train, validation = train_eval_split(rest, eval_fraction=opts.validation / len(rest), seed=opts.data_seed + 1,
                                         privacy_unit="record")  # fmt: skip
    pack = functools.partial(pack_records, encode=tok.encode, seq_len=opts.seq_len, eos_id=tok.eos_id,
                             pad_id=tok.pad_id, privacy_unit="record", mode="per_record")  # fmt: skip
    spans = (lambda rs: field_spans(rs, tok.encode)) if opts.corpus == "consortium" else (lambda rs: None)
    return Split(source, pack(train), pack(validation), pack(held_out), spans(validation), spans(held_out))


def score(model: torch.nn.Module, split: Split) -> Scores:
    def one(data: PackedData, spans: list[tuple[int, int]] | None) -> TaskScore:
        spans = spans or [(1, 2)] * len(data)  # no task field: accuracy is meaningless, loss is not
        return evaluate_task(model, data.inputs, data.targets, spans)

    return Scores(one(split.validation, split.validation_spans), one(split.held_out, split.held_out_spans))


# ---- accounting: memoized (bench-only, same numbers) --------------------------------------------


@contextmanager
def memoized_accounting() -> Iterator[None]:
    """Memoizes sigma calibration per plan (ignoring the bank's name) and epsilon per history; restored on exit."""
    calibrate, epsilon = trainer_module.noise_multiplier_for, accountant_module.epsilon_for_history

    @functools.cache
    def calibrate_plan(cfg, n_samples):  # noqa: ANN001, ANN202
        return calibrate(cfg, n_samples)

    def noise_multiplier_for(cfg, n_samples):  # noqa: ANN001, ANN202
        return calibrate_plan(cfg.replace(bank_id="any-bank"), n_samples)

    @functools.cache
    def epsilon_of(history, delta, mechanism):  # noqa: ANN001, ANN202
        return epsilon(list(history), delta=delta, mechanism=mechanism)

    def epsilon_for_history(history, *, delta, mechanism="prv"):  # noqa: ANN001, ANN202
        return epsilon_of(tuple(tuple(e) for e in history), delta, mechanism)

    trainer_module.noise_multiplier_for = noise_multiplier_for
    accountant_module.epsilon_for_history = epsilon_for_history
    try:
        yield
    finally:
        trainer_module.noise_multiplier_for = calibrate
        accountant_module.epsilon_for_history = epsilon


# ---- the arms ---------------------------------------------------------------------------------------


def run_federation(opts: Options, members: list[int], data: dict[int, Split], *, lr: float, seed: int) -> dict:
    """DP-FedSGD of `members` (one member = the bank alone); each member's scores and epsilon."""
    job = opts.job(lr=lr, seed=seed)
    model = build_model(job)
    view = TrainableView(model)
    global_N = view.flatten()
    banks = [BankConfig(bank_id=f"bank-{i}", state_root=Path("unused"), key_path=Path("unused"), partition_id=i)
             for i in members]  # fmt: skip
    cfgs = {b.bank_id: local_dp_config(job, dp_config(job, b)) for b in banks}
    states = {b.bank_id: AccountantState.fresh(cfgs[b.bank_id]) for b in banks}
    optimizer, opt_state, bound = FedOptimizer.of(job), FedOptState.fresh(view.numel), update_clamp(job)
    sigma = 0.0
    for r in range(1, job.num_rounds + 1):
        sum_N = torch.zeros_like(global_N, dtype=torch.float64)
        for bank in banks:
            view.load_flat_(global_N)
            report = train_private_round(model, data[bank.partition_id].train, cfgs[bank.bank_id],
                                         states[bank.bank_id], seed=round_seed(job, bank.bank_id, r))  # fmt: skip
            states[bank.bank_id], sigma = report.accountant_state, report.sigma
            delta_N = view.flatten() - global_N
            if optimizer.stateful:
                delta_N = delta_N.clamp(-bound, bound)
            sum_N += delta_N.double()
        update_N, opt_state = fed_step(optimizer, opt_state, sum_N / len(banks))
        global_N = global_N + update_N
    view.load_flat_(global_N)
    eps = max(s.epsilon() for s in states.values())
    return {"scores": {i: score(model, data[i]) for i in members}, "epsilon": round(eps, 3), "sigma": sigma}


def run_plain(opts: Options, members: list[int], data: dict[int, Split], *, lr: float, seed: int) -> dict:
    """Non-private AdamW on the union of the members' train splits, batch len(members) x B, same steps."""
    model = build_model(opts.job(lr=lr, seed=seed))
    inputs = torch.cat([data[i].train.inputs for i in members])
    targets = torch.cat([data[i].train.targets for i in members])
    cfg = TrainConfig(steps=opts.steps, batch_size=opts.batch * len(members), lr=lr,
                      warmup_steps=max(1, opts.steps // 10), seed=seed, balance_routing=False)  # fmt: skip
    train_local(model, inputs, targets, cfg)
    return {"scores": {i: score(model, data[i]) for i in members}}


@dataclass
class Arm:
    """One arm on one group of banks: the lr chosen on validation and the held-out runs per seed."""

    name: str
    members: list[int]
    private: bool
    tuning: dict[float, float] = field(default_factory=dict)  # lr -> mean validation loss
    lr: float = 0.0
    runs: list[dict] = field(default_factory=list)  # one per seed (the first from tuning)


def run_arm(opts: Options, arm: Arm, data: dict[int, Split]) -> Arm:
    run = run_federation if arm.private else run_plain
    grid = opts.lr_grid if arm.private else opts.plain_lr_grid
    first, *rest = opts.seeds
    tried = {lr: run(opts, arm.members, data, lr=lr, seed=first) for lr in grid}
    arm.tuning = {lr: statistics.mean(s.validation.loss for s in r["scores"].values()) for lr, r in tried.items()}
    arm.lr = min(arm.tuning, key=arm.tuning.__getitem__)
    runs = [tried[arm.lr]] + [run(opts, arm.members, data, lr=arm.lr, seed=s) for s in rest]
    arm.runs = [{**r, "seed": s, "scores": {i: asdict(sc.held_out) for i, sc in r["scores"].items()}}
                for s, r in zip(opts.seeds, runs, strict=True)]  # fmt: skip
    logger.info("%s %s: lr %g (validation %s)", arm.name, arm.members, arm.lr, arm.tuning)
    return arm


def arms_of(opts: Options, n_max: int) -> list[Arm]:
    arms = [Arm("alone", [i], True) for i in range(n_max)] + [Arm("own", [i], False) for i in range(n_max)]
    for size in opts.banks:
        arms += [Arm(f"fed{size}", list(range(size)), True), Arm(f"pooled{size}", list(range(size)), False)]
    return arms


# ---- the table ----------------------------------------------------------------------------------------


def per_bank(opts: Options, arms: list[Arm], sources: dict[int, str]) -> dict[str, dict]:
    """bank -> arm -> mean/spread of held-out loss and accuracy over seeds, the lr, and the pick."""
    out: dict[str, dict] = {}
    for i in sorted(sources):
        row: dict[str, object] = {"source": sources[i]}
        for arm in (a for a in arms if i in a.members):
            losses = [r["scores"][i]["loss"] for r in arm.runs]
            accs = [r["scores"][i]["field_accuracy"] for r in arm.runs]
            row[arm.name] = {
                "loss": round(statistics.mean(losses), 4),
                "loss_spread": round(max(losses) - min(losses), 4),
                "losses": [round(x, 4) for x in losses],  # per seed, in --seeds order (paired across arms)
                "accuracy": round(statistics.mean(accs), 4) if opts.corpus == "consortium" else None,
                "accuracy_spread": round(max(accs) - min(accs), 4) if opts.corpus == "consortium" else None,
                "lr": arm.lr,
                **({"epsilon": arm.runs[0]["epsilon"], "sigma": round(arm.runs[0]["sigma"], 4)} if arm.private else {}),
            }
        private = [k for k in row if k == "alone" or k.startswith("fed")]
        row["pick"] = min(private, key=lambda k: row[k]["loss"])  # type: ignore[index]
        out[f"bank-{i}"] = row
    return out


def gains(opts: Options, table: dict[str, dict]) -> dict[str, dict]:
    """Per size: alone - fed loss per member (gain), the seed spread it must beat, the relative gain."""
    out: dict[str, dict] = {}
    for size in opts.banks:
        rows = [table[f"bank-{i}"] for i in range(size)]
        gain = [r["alone"]["loss"] - r[f"fed{size}"]["loss"] for r in rows]
        spread = [max(r["alone"]["loss_spread"], r[f"fed{size}"]["loss_spread"]) for r in rows]
        rel = [g / r["alone"]["loss"] for g, r in zip(gain, rows, strict=True)]
        # paired by seed (same init, batches and noise seeds on both sides): the gain's own spread
        paired = [[a - f for a, f in zip(r["alone"]["losses"], r[f"fed{size}"]["losses"], strict=True)] for r in rows]
        out[str(size)] = {
            "gain_per_bank": [round(g, 4) for g in gain],
            "paired_gain_spread_per_bank": [round(max(p) - min(p), 4) for p in paired],
            "banks_gaining_in_every_seed": sum(min(p) > 0 for p in paired),
            "banks_gain_above_paired_spread": sum(g > max(p) - min(p) for g, p in zip(gain, paired, strict=True)),
            "mean_gain": round(statistics.mean(gain), 4),
            "min_gain": round(min(gain), 4),
            "mean_relative_gain": round(statistics.mean(rel), 4),
            "banks_beating_alone_by_more_than_spread": sum(g > s for g, s in zip(gain, spread, strict=True)),
            "banks": size,
        }
        if opts.corpus == "consortium":
            acc = [r[f"fed{size}"]["accuracy"] - r["alone"]["accuracy"] for r in rows]
            out[str(size)]["mean_accuracy_gain"] = round(statistics.mean(acc), 4)
    return out


def experiment(opts: Options, only: set[str]) -> dict[str, object]:
    """Runs the arms (all, or those named in `only`) and returns their raw results."""
    started = time.perf_counter()
    n_max = max(opts.banks)
    data = {i: split_bank(opts, src, recs) for i, (src, recs) in enumerate(bank_records(opts, n_max))}
    initial = score(build_model(opts.job(lr=opts.lr_grid[0], seed=opts.seeds[0])), data[0]).held_out.loss
    arms = []
    with memoized_accounting():
        for arm in (a for a in arms_of(opts, n_max) if not only or a.name in only):
            t = time.perf_counter()
            arms.append(run_arm(opts, arm, data))
            logger.warning("%s %s done in %.0f s (lr %g)", arm.name, arm.members, time.perf_counter() - t, arm.lr)
    return {
        "options": asdict(opts),
        "samples_per_bank": {k: len(getattr(data[0], k)) for k in ("train", "validation", "held_out")},
        "initial_loss_bank0": round(initial, 4),
        "sources": {i: d.source for i, d in data.items()},
        "arms": [asdict(a) for a in arms],
        "seconds": round(time.perf_counter() - started, 1),
    }


def merged_arms(arms: list[Arm], seeds: tuple[int, ...] | None = None) -> list[Arm]:
    """One arm per (name, members), joined from partial runs (parts of the lr grid, parts of the seeds).

    The tuning grid is the union of the parts' (a part tuned with another first seed comes with an
    empty one: it adds runs only); the lr with the best validation loss is kept, with its runs: with
    `seeds` and runs that carry their seed, one per seed in `seeds` order, gathered from every part
    run at that lr (an arm without a run for every seed is left out, with a warning); otherwise (raw
    files from before runs carried seeds) the tuned part's runs.
    """
    groups: dict[tuple[str, tuple[int, ...]], list[Arm]] = {}
    for arm in arms:
        arm.tuning = {float(lr): loss for lr, loss in arm.tuning.items()}
        groups.setdefault((arm.name, tuple(arm.members)), []).append(arm)
    out = []
    for (name, members), parts in groups.items():
        tuning = {lr: loss for part in parts for lr, loss in part.tuning.items()}
        if not tuning:
            raise SystemExit(f"--merge: {name} {list(members)}: no part tuned it (none ran the first seed)")
        lr = min(tuning, key=tuning.__getitem__)
        at_lr = [part for part in parts if part.lr == lr]
        if seeds is not None and all("seed" in r for part in at_lr for r in part.runs):
            by_seed: dict[int, dict] = {}
            for part in at_lr:
                for r in part.runs:
                    by_seed.setdefault(int(r["seed"]), r)
            if missing := [s for s in seeds if s not in by_seed]:
                logger.warning("--merge: %s %s left out: lr %g has no run of seeds %s", name, members, lr, missing)
                continue
            runs = [by_seed[s] for s in seeds]
        else:
            runs = next(part for part in at_lr if part.tuning).runs
        out.append(replace(parts[0], tuning=tuning, lr=lr, runs=runs))
    return out


def summarize(opts: Options, raw: dict[str, object]) -> dict[str, object]:
    """The table from raw results (one run's, or several partial runs' merged)."""
    names = {"alone", "own"} | {f"{kind}{n}" for n in opts.banks for kind in ("fed", "pooled")}
    arms = merged_arms([Arm(**a) for a in raw["arms"] if a["name"] in names], opts.seeds)  # type: ignore[index]
    for arm in arms:  # JSON keys are strings
        arm.runs = [{**r, "scores": {int(i): sc for i, sc in r["scores"].items()}} for r in arm.runs]
    sources = {int(i): s for i, s in raw["sources"].items()}  # type: ignore[union-attr]
    table = per_bank(opts, arms, sources)
    by_size = gains(opts, table)
    smallest, largest = by_size[str(min(opts.banks))], by_size[str(max(opts.banks))]
    return {
        "bench": "utility",
        "options": asdict(opts),
        "samples_per_bank": raw["samples_per_bank"],
        "initial_loss_bank0": raw["initial_loss_bank0"],
        "banks": table,
        "gain_by_size": by_size,
        "tuning": {f"{a.name}{a.members if len(a.members) == 1 else ''}": a.tuning for a in arms},
        "done_when": {
            "every_bank_beats_alone_at_smallest_by_more_than_spread": (
                smallest["banks_beating_alone_by_more_than_spread"] == smallest["banks"]
            ),
            "mean_gain_at_largest_exceeds_smallest": largest["mean_gain"] > smallest["mean_gain"],
        },
        "seconds": raw["seconds"],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def markdown(result: dict) -> str:
    """The per-bank table of docs/utility.md: held-out loss mean +- spread (accuracy in brackets), the pick."""
    opts, banks = result["options"], result["banks"]
    arms = ["alone"] + [f"fed{n}" for n in opts["banks"]] + ["own"] + [f"pooled{n}" for n in opts["banks"]]
    lines = ["| bank | " + " | ".join(arms) + " | pick |", "|" + " --- |" * (len(arms) + 2)]
    for name, row in banks.items():
        cells = []
        for arm in arms:
            cell = row.get(arm)
            acc = f" ({cell['accuracy']:.2f})" if cell and cell["accuracy"] is not None else ""
            cells.append(f"{cell['loss']:.3f} ± {cell['loss_spread']:.3f}{acc}" if cell else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['pick']} |")
    head = "| banks | mean gain | min gain | relative | > either spread | every seed | > paired spread | acc. gain |"
    lines += ["", head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size, g in result["gain_by_size"].items():
        rel = 100 * g["mean_relative_gain"]
        n = g["banks"]
        lines.append(f"| {size} | {g['mean_gain']:+.3f} | {g['min_gain']:+.3f} | {rel:+.1f}% | "
                     f"{g['banks_beating_alone_by_more_than_spread']} of {n} | "
                     f"{g['banks_gaining_in_every_seed']} of {n} | {g['banks_gain_above_paired_spread']} of {n} | "
                     f"{g.get('mean_accuracy_gain', float('nan')):+.3f} |")  # fmt: skip
    return "\n".join(lines)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    d = Options()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=d.corpus, choices=("consortium", "locales"))
    p.add_argument("--banks", default=",".join(map(str, d.banks)), help="federation sizes, comma-separated")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="seeds; the first tunes")
    p.add_argument("--lr-grid", default=",".join(map(str, d.lr_grid)), help="lrs of the update rule (DP arms)")
    p.add_argument("--plain-lr-grid", default=",".join(map(str, d.plain_lr_grid)), help="AdamW lrs (non-private)")
    for name in ("preset", "train_mode", "update_rule"):
        p.add_argument(f"--{name.replace('_', '-')}", default=getattr(d, name))
    for name in ("steps", "local_steps", "batch", "records_per_bank", "held_out", "validation", "seq_len", "data_seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("local_lr", "epsilon", "delta", "clip_norm"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared box)")
    p.add_argument("--only", default="", help="arms to run, e.g. alone,own,fed3,pooled3 (default: all)")
    p.add_argument("--raw", type=Path, help="write the raw results of the arms run here")
    p.add_argument("--merge", nargs="+", type=Path, help="raw files of partial runs (lrs, seeds): their joint table")
    p.add_argument("--markdown", action="store_true", help="print the per-bank table as markdown, not JSON")
    args = p.parse_args(argv)
    banks = tuple(sorted({int(b) for b in args.banks.split(",") if b.strip()}))
    if not banks or banks[0] < 1:
        p.error(f"--banks: expected positive federation sizes, got {args.banks!r}")
    opts = replace(
        d,
        banks=banks,
        seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()),
        lr_grid=_floats(args.lr_grid),
        plain_lr_grid=_floats(args.plain_lr_grid),
        **{k: getattr(args, k) for k in asdict(d) if k not in ("banks", "seeds", "lr_grid", "plain_lr_grid")},
    )
    return opts, args


def main(argv: list[str] | None = None) -> None:
    opts, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "WARNING"), format="%(asctime)s %(name)s: %(message)s", force=True
    )
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        for part in parts:  # runs carry their seed; a part tuned with another first seed adds runs only
            part_seeds = part["options"]["seeds"]
            for arm in part["arms"]:
                for run, seed in zip(arm["runs"], part_seeds, strict=True):
                    run.setdefault("seed", seed)
                if part_seeds[0] != opts.seeds[0]:
                    arm["tuning"] = {}
        raw = {**parts[0], "arms": [a for part in parts for a in part["arms"]],
               "seconds": sum(part["seconds"] for part in parts)}  # fmt: skip
    else:
        raw = experiment(opts, {a for a in args.only.split(",") if a})
        if args.raw:
            args.raw.parent.mkdir(parents=True, exist_ok=True)
            args.raw.write_text(json.dumps(raw, default=str))
        if args.only:
            return
    result = json.loads(json.dumps(summarize(opts, raw), default=str))  # the JSON line's own view
    print(markdown(result) if args.markdown else json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
