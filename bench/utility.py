"""The experiment a consortium decides on: what does federating buy each bank, at the same epsilon?

    .venv/bin/python bench/utility.py [--banks 3,5,10,15] [--rounds 4] [--local-steps 10] ...
    make experiment

On the synthetic non-IID bank corpus (fedmoe.fl_client.data: each bank its own locale, products,
templates), with the same compute and the same epsilon per bank, for every bank:
    alone       the bank trains alone with DP: the same rounds x local steps on its own data only,
                the same epsilon (a federation of one, through the same code);
    federated   DP federations of 3, 5, 10 and 15 banks (banks 0..N-1: banks 0..2 are in every
                federation, so their numbers compare across sizes);
    central     plain (non-private) training on the union of every bank's training data: the
                ceiling, with the same total steps (rounds x local steps at the same batch size).
Each loss is the mean next-token cross-entropy on the bank's own held-out records
(fedmoe.fl_client.train.evaluate), and
    gap_share = (loss_alone - loss_federated) / (loss_alone - loss_central)
is the share of the gap between training alone and the non-private ceiling that federating
closes (1 = federated reaches the ceiling, 0 = no better than alone, < 0 = worse). The goal for
the defaults: gap_share >= 0.5 for every bank at 3 banks, and more banks close more.
Prints ONE JSON line and writes a plot (--plot, default runs/experiment/utility.png).

How a round runs (in-process: no Flower, no encryption). Every member starts from the global
trainable view, runs `fedmoe.fl_client.dp.train_private_round` (real Poisson sampling, per-sample
clipping, Gaussian noise, the real PRV accountant calibrating sigma for the planned rounds and
checking the budget before every round), its delta = local - global; the mean of the deltas with
weight 1 per bank is applied to the global view. That is exactly what the encrypted path computes
(fedmoe/fl_client/bank.py + crypto: the secure aggregate of the deltas differs from the plaintext mean by
~1e-10). Data: `fedmoe.fl_client.task.load_bank_data` with a `fedmoe.protocol.config.JobConfig` and a
`fedmoe.fl_client.config.BankConfig` (partition-id = bank index). The corpus is always drawn with
`synthetic-banks` = the largest federation, because `make_bank_profiles` draws every profile from
one stream: bank 0's data must be the same records in every federation it joins.

Noise is seeded (`secure-mode=false`, seeds from `fedmoe.fl_client.task.round_seed`) so that runs are
reproducible and every method sees the same batches and noise draws for a given bank and round;
shipped runs draw sampling and noise from the OS CSPRNG (secure_mode), which changes the draws,
not the mechanism, sigma or the accounting.

Two bench-only shortcuts that change no number: every bank has the same plan (same n, q, sigma,
steps), so the accountant's pure functions are memoized for the run (`noise_multiplier_for` once
per plan instead of once per bank, ~10 s each with PRV; `epsilon_for_history` once per history
instead of twice per bank and round, ~0.8 s each). Without them accounting would take longer
than training on this machine.

Defaults, and why (measured on 2 shared cores, torch 1 thread). `--preset tiny` (0.26M params)
with `--train-mode full`: the base model is a seeded random init (no pretrained checkpoint), on
which FFA-LoRA barely moves the loss (5.79 -> 5.53 in 40 private steps of `tiny`), so every method
would sit within noise of the others; full fine-tuning of `tiny` goes 5.79 -> 3.5 in the same
steps. `small` costs ~5x per step. `--records-per-bank 400` (360 train, 40 held out per bank):
data-poor banks, the case for a consortium. `--rounds 4 --local-steps 10 --batch 16 --epsilon 8
--lr 0.01 --seq-len 128` (the job's epsilon and lr; alone, lr 0.003 is clearly worse and 0.03
no better on average): the run trains 48 bank x plans (15 alone + 3 + 5 + 10 + 15 federated) of
40 DP steps, 441 s measured.
Records longer than seq-len + 1 tokens are truncated (pack_records says how many, per bank).

What the defaults show (docs/utility.md has the table): the goal is not met. With the shipped
round (fresh AdamW every round, plain mean) federating makes 14 of 15 banks worse than alone
(gap_share -0.54..-0.07 for banks 0..2 at 3 banks; mean -0.26, -0.21, -0.28, -0.31 at 3, 5, 10,
15 banks), and more banks do not close more.

Part 2 options (experiments, not shipped behaviour; fl_client is not edited):
    --keep-optimizer-state   each bank keeps its AdamW moments across its rounds (fl_client
                             builds a fresh optimizer every round); done by wrapping
                             `fedmoe.fl_client.dp.engine._base_optimizer` for the bank's round.
    --server-opt scaled|avgm|adam   a server-side step on the mean delta (server_lr x mean,
                             FedAvgM, FedAdam; Reddi et al., ICLR 2021): post-processing of DP
                             outputs, a pure function of the aggregates, applied identically by
                             every bank; `--server-lr` (x sqrt(N) with `--server-lr-sqrt-n`),
                             `--server-momentum` (beta1), `--server-beta2`, `--server-tau`. A bank
                             alone has no server: it always applies its own delta as it is.
    --batch B --local-steps S   a larger expected batch with fewer steps, or more local steps:
                             sigma is recalibrated so epsilon stays the same.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedmoe.fl_client.dp.accountant as accountant_module  # noqa: E402
import fedmoe.fl_client.dp.engine as engine_module  # noqa: E402
import fedmoe.fl_client.dp.trainer as trainer_module  # noqa: E402
from fedmoe.fl_client.config import BankConfig  # noqa: E402
from fedmoe.fl_client.dp import train_private_round  # noqa: E402
from fedmoe.fl_client.dp.accountant import AccountantState  # noqa: E402
from fedmoe.fl_client.task import BankData, build_model, dp_config, load_bank_data, round_seed  # noqa: E402
from fedmoe.fl_client.train import TrainConfig, evaluate, train_local  # noqa: E402
from fedmoe.model.trainable import TrainableView  # noqa: E402
from fedmoe.protocol.config import JobConfig  # noqa: E402

logger = logging.getLogger("bench.utility")

SERVER_OPTS = ("mean", "scaled", "avgm", "adam")


@dataclass(frozen=True)
class Options:
    """One experiment: model, data, DP plan, federation sizes, and the part-2 switches."""

    preset: str = "tiny"
    train_mode: str = "full"
    banks: tuple[int, ...] = (3, 5, 10, 15)
    rounds: int = 4
    local_steps: int = 10
    batch: int = 16  # expected (Poisson) batch under DP; the batch of central training
    records_per_bank: int = 400
    seq_len: int = 128
    lr: float = 0.01
    central_lr: float = 0.01
    epsilon: float = 8.0
    delta: float = 1e-5
    clip_norm: float = 1.0
    seed: int = 0
    keep_optimizer_state: bool = False
    server_opt: str = "mean"
    server_lr: float = 1.0
    server_lr_sqrt_n: bool = False  # multiply server_lr by sqrt(banks in the federation)
    server_momentum: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3

    def job(self) -> JobConfig:
        return JobConfig(
            job_id="utility",
            num_rounds=self.rounds,
            seed=self.seed,
            model_preset=self.preset,
            train_mode=self.train_mode,
            seq_len=self.seq_len,
            local_steps=self.local_steps,
            batch_size=self.batch,
            lr=self.lr,
            synthetic_banks=max(self.banks),  # the same records for bank i in every federation
            records_per_bank=self.records_per_bank,
            epsilon=self.epsilon,
            delta=self.delta,
            clip_norm=self.clip_norm,
            secure_mode=False,  # seeded noise: reproducible comparison (shipped runs: CSPRNG)
        )


def bank_config(i: int, root: Path) -> BankConfig:
    return BankConfig(bank_id=f"bank-{i}", state_root=root / f"bank-{i}", key_path=root / "unused.key", partition_id=i)


# ---- accounting: memoized (bench-only, same numbers) --------------------------------------------


@contextmanager
def memoized_accounting() -> Iterator[None]:
    """Memoizes sigma calibration per plan (ignoring the bank's name) and epsilon per history.

    Both are pure functions of plain numbers (fedmoe.fl_client.dp.accountant); every bank here has the
    same plan, so one computation serves all of them. Restored on exit.
    """
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


# ---- part 2: optimizer state kept across rounds ----------------------------------------------------


class OptimizerCarry:
    """Each bank's AdamW state kept from one of its rounds to the next (part 2 option).

    fl_client builds a fresh optimizer in every `make_private`; this wraps its factory for one
    bank's round, loads the bank's saved state into the new optimizer and saves it afterwards.
    The moments are the bank's own post-processing of its noised gradients: nothing leaves.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.saved: dict[str, dict] = {}

    @contextmanager
    def round_of(self, bank_id: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        original = engine_module._base_optimizer
        built: list[torch.optim.Optimizer] = []

        def base_optimizer(params, cfg):  # noqa: ANN001, ANN202
            optimizer = original(params, cfg)
            if bank_id in self.saved:
                optimizer.load_state_dict(self.saved[bank_id])
            built.append(optimizer)
            return optimizer

        engine_module._base_optimizer = base_optimizer
        try:
            yield
        finally:
            engine_module._base_optimizer = original
        assert len(built) == 1, len(built)
        self.saved[bank_id] = copy.deepcopy(built[0].state_dict())


# ---- part 2: server optimizer on the mean delta ----------------------------------------------------


class ServerOptimizer:
    """global <- global + update(mean delta): mean, scaled mean, FedAvgM or FedAdam (Reddi et al., 2021).

    A pure function of the sequence of aggregates, so every bank computes the same global model
    from the same aggregates (post-processing of DP outputs: no privacy cost).
    """

    def __init__(self, opts: Options, numel: int, n_banks: int) -> None:
        self.opts = opts
        self.lr = opts.server_lr * (math.sqrt(n_banks) if opts.server_lr_sqrt_n else 1.0)
        self.m_N = torch.zeros(numel, dtype=torch.float64)
        self.v_N = torch.full((numel,), opts.server_tau**2, dtype=torch.float64)

    def step(self, mean_N: torch.Tensor) -> torch.Tensor:
        o = self.opts
        if o.server_opt == "mean":
            return mean_N
        d = mean_N.double()
        if o.server_opt == "scaled":
            return (self.lr * d).float()
        if o.server_opt == "avgm":
            self.m_N = o.server_momentum * self.m_N + d
            return (self.lr * self.m_N).float()
        self.m_N = o.server_momentum * self.m_N + (1 - o.server_momentum) * d
        self.v_N = o.server_beta2 * self.v_N + (1 - o.server_beta2) * d * d
        return (self.lr * self.m_N / (self.v_N.sqrt() + o.server_tau)).float()


# ---- the three methods ------------------------------------------------------------------------------


def run_federation(opts: Options, members: list[int], data: dict[int, BankData], root: Path) -> dict[int, float]:
    """DP federation of `members` (one member = the bank alone); held-out loss of each member.

    Every round: each member loads the global view, trains one private round, delta = local -
    global; the global view moves by the mean delta (weight 1 per bank; the server optimizer,
    if any, post-processes it).
    """
    job = opts.job()
    model = build_model(job)
    view = TrainableView(model)
    global_N = view.flatten()
    banks = [bank_config(i, root) for i in members]
    cfgs = {b.bank_id: dp_config(job, b) for b in banks}
    states = {b.bank_id: AccountantState.fresh(cfgs[b.bank_id]) for b in banks}
    carry = OptimizerCarry(opts.keep_optimizer_state)
    alone = len(members) == 1  # a bank alone has no server: its own delta, as it is
    server = ServerOptimizer(replace(opts, server_opt="mean") if alone else opts, view.numel, len(members))
    for r in range(1, opts.rounds + 1):
        sum_N = torch.zeros_like(global_N, dtype=torch.float64)
        for bank in banks:
            view.load_flat_(global_N)
            with carry.round_of(bank.bank_id):
                report = train_private_round(
                    model,
                    data[bank.partition_id].train,
                    cfgs[bank.bank_id],
                    states[bank.bank_id],
                    seed=round_seed(job, bank.bank_id, r),
                )
            states[bank.bank_id] = report.accountant_state
            sum_N += (view.flatten() - global_N).double()
        global_N = global_N + server.step((sum_N / len(banks)).float())
    view.load_flat_(global_N)
    eps = {b.bank_id: round(states[b.bank_id].epsilon(), 3) for b in banks}
    losses = {i: held_out_loss(model, data[i]) for i in members}
    logger.info("federation %s: %d rounds, epsilon %s, held-out loss %s", members, opts.rounds, eps, losses)
    return losses


def run_central(opts: Options, members: list[int], data: dict[int, BankData]) -> dict[int, float]:
    """Plain AdamW on the union of the members' training data, rounds x local steps; the ceiling."""
    model = build_model(opts.job())
    inputs = torch.cat([data[i].train.inputs for i in members])
    targets = torch.cat([data[i].train.targets for i in members])
    cfg = TrainConfig(
        steps=opts.rounds * opts.local_steps,
        batch_size=opts.batch,
        lr=opts.central_lr,
        warmup_steps=max(1, opts.rounds * opts.local_steps // 10),
        seed=opts.seed,
        balance_routing=False,  # as under DP: the comparison is about data and privacy, not routing
    )
    train_local(model, inputs, targets, cfg)
    return {i: held_out_loss(model, data[i]) for i in members}


def held_out_loss(model: torch.nn.Module, bank: BankData) -> float:
    return round(evaluate(model, bank.held_out.inputs, bank.held_out.targets), 4)


# ---- the experiment ---------------------------------------------------------------------------------


def experiment(opts: Options) -> dict[str, object]:
    started = time.perf_counter()
    job = opts.job()
    n_max = max(opts.banks)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vocab = build_model(job).config.vocab_size
        data = {i: load_bank_data(job, bank_config(i, root), vocab) for i in range(n_max)}
        with memoized_accounting():
            t = time.perf_counter()
            central = run_central(opts, list(range(n_max)), data)
            seconds = {"central": time.perf_counter() - t}
            t = time.perf_counter()
            initial = {i: held_out_loss(build_model(job), data[i]) for i in range(n_max)}
            alone: dict[int, float] = {}
            for i in range(n_max):
                alone.update(run_federation(opts, [i], data, root))
            seconds["alone"] = time.perf_counter() - t
            federated: dict[int, dict[int, float]] = {}
            for size in opts.banks:
                t = time.perf_counter()
                federated[size] = run_federation(opts, list(range(size)), data, root)
                seconds[f"federated_{size}"] = time.perf_counter() - t
                logger.info("federation of %d done in %.0fs", size, seconds[f"federated_{size}"])
    return summarize(opts, data, initial, alone, federated, central, seconds, time.perf_counter() - started)


def gap_share(alone: float, fed: float, central: float) -> float | None:
    gap = alone - central
    return round((alone - fed) / gap, 3) if gap > 0 else None


def summarize(
    opts: Options,
    data: dict[int, BankData],
    initial: dict[int, float],
    alone: dict[int, float],
    federated: dict[int, dict[int, float]],
    central: dict[int, float],
    seconds: dict[str, float],
    total_seconds: float,
) -> dict[str, object]:
    banks: dict[str, object] = {}
    for i in sorted(alone):
        fed = {str(size): federated[size][i] for size in opts.banks if i in federated[size]}
        share = {s: gap_share(alone[i], loss, central[i]) for s, loss in fed.items()}
        banks[f"bank-{i}"] = {
            "source": data[i].source,
            "initial": initial[i],
            "alone": alone[i],
            "federated": fed,
            "central": central[i],
            "gap_share": share,
        }
    by_size: dict[str, object] = {}
    for size in opts.banks:
        shares = [banks[f"bank-{i}"]["gap_share"][str(size)] for i in range(size)]  # type: ignore[index]
        known = [s for s in shares if s is not None]
        by_size[str(size)] = {
            "min": min(known) if known else None,
            "mean": round(sum(known) / len(known), 3) if known else None,
            "banks_at_least_half": sum(s >= 0.5 for s in known),
            "banks": size,
        }
    first = by_size[str(min(opts.banks))]
    core = [i for i in range(min(opts.banks))]  # in every federation
    core_monotone = all(
        _non_decreasing([banks[f"bank-{i}"]["gap_share"][str(s)] for s in sorted(opts.banks)])  # type: ignore[index]
        for i in core
    )
    means = [by_size[str(s)]["mean"] for s in sorted(opts.banks)]  # type: ignore[index]
    goal = {
        "every_bank_at_least_half_at_smallest": first["banks_at_least_half"] == first["banks"],  # type: ignore[index]
        "mean_share_grows_with_size": _non_decreasing(means),
        "core_banks_share_grows_with_size": core_monotone,
    }
    goal["met"] = all(goal.values())
    return {
        "bench": "utility",
        "options": asdict(opts),
        "train_samples_per_bank": int(data[0].train.inputs.shape[0]),
        "held_out_samples_per_bank": int(data[0].held_out.inputs.shape[0]),
        "banks": banks,
        "gap_share_by_size": by_size,
        "goal": goal,
        "seconds": {k: round(v, 1) for k, v in {**seconds, "total": total_seconds}.items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _non_decreasing(values: list[float | None]) -> bool:
    known = [v for v in values if v is not None]
    return len(known) == len(values) and all(a <= b + 1e-9 for a, b in zip(known, known[1:], strict=False))


# ---- the plot ---------------------------------------------------------------------------------------


def plot(result: dict[str, object], path: Path) -> None:
    """Left: held-out loss per bank (alone, each federation it joins, central). Right: gap share
    vs federation size, one line per bank."""
    from matplotlib.figure import Figure  # lazy: the experiment itself does not need it

    banks: dict[str, dict] = result["banks"]  # type: ignore[assignment]
    sizes = list(result["options"]["banks"])  # type: ignore[index]
    fig = Figure(figsize=(14, 5.5), layout="constrained")
    ax_loss, ax_share = fig.subplots(1, 2, width_ratios=(2, 1))
    names = list(banks)
    x = range(len(names))
    ax_loss.scatter(x, [banks[b]["alone"] for b in names], marker="v", color="tab:red", label="alone (DP)", zorder=3)
    ax_loss.scatter(x, [banks[b]["central"] for b in names], marker="^", color="black", label="central (no DP)")
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")
    for k, size in enumerate(sizes):
        pts = [(j, banks[b]["federated"][str(size)]) for j, b in enumerate(names) if str(size) in banks[b]["federated"]]
        ax_loss.scatter(
            *zip(*pts, strict=True), marker="o", s=18, color=colors[k % 5], label=f"federated, {size} banks"
        )
    ax_loss.set_xticks(list(x), [b.removeprefix("bank-") for b in names])
    ax_loss.set_xlabel("bank")
    ax_loss.set_ylabel("held-out loss (nats/token)")
    o = result["options"]
    ax_loss.set_title(
        f"{o['preset']}/{o['train_mode']}, eps={o['epsilon']} per bank, {o['rounds']} rounds x {o['local_steps']} "  # type: ignore[index]
        f"steps, batch {o['batch']}"  # type: ignore[index]
    )
    ax_loss.legend(fontsize=8)
    for j, b in enumerate(names):
        pts = [(s, banks[b]["gap_share"][str(s)]) for s in sizes if banks[b]["gap_share"].get(str(s)) is not None]
        if pts:
            core = j < min(sizes)
            ax_share.plot(*zip(*pts, strict=True), marker="o", lw=2 if core else 0.8, alpha=1 if core else 0.5)
    ax_share.axhline(0.5, color="gray", ls="--", lw=1)
    ax_share.axhline(0.0, color="gray", lw=0.5)
    ax_share.set_xticks(sizes)
    ax_share.set_xlabel("banks in the federation")
    ax_share.set_ylabel("gap share = (alone - federated) / (alone - central)")
    ax_share.set_title("gap share (bold: banks 0..2, in every federation)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    d = Options()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--train-mode", default=d.train_mode, choices=("full", "lora", "router+experts"))
    p.add_argument("--banks", default=",".join(map(str, d.banks)), help="federation sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--local-steps", type=int, default=d.local_steps)
    p.add_argument("--batch", type=int, default=d.batch, help="expected (Poisson) batch size")
    p.add_argument("--records-per-bank", type=int, default=d.records_per_bank)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate of the private local steps")
    p.add_argument("--central-lr", type=float, default=d.central_lr)
    p.add_argument("--epsilon", type=float, default=d.epsilon)
    p.add_argument("--delta", type=float, default=d.delta)
    p.add_argument("--clip-norm", type=float, default=d.clip_norm)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--keep-optimizer-state", action="store_true")
    p.add_argument("--server-opt", default=d.server_opt, choices=SERVER_OPTS)
    p.add_argument("--server-lr", type=float, default=d.server_lr)
    p.add_argument("--server-lr-sqrt-n", action="store_true", help="scale --server-lr by sqrt(banks)")
    p.add_argument("--server-momentum", type=float, default=d.server_momentum)
    p.add_argument("--server-beta2", type=float, default=d.server_beta2)
    p.add_argument("--server-tau", type=float, default=d.server_tau)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared box)")
    p.add_argument("--plot", type=Path, default=Path("runs/experiment/utility.png"))
    args = p.parse_args(argv)
    banks = tuple(sorted({int(b) for b in args.banks.split(",") if b.strip()}))
    if not banks or banks[0] < 1:
        p.error(f"--banks: expected positive federation sizes, got {args.banks!r}")
    opts = Options(
        preset=args.preset,
        train_mode=args.train_mode,
        banks=banks,
        rounds=args.rounds,
        local_steps=args.local_steps,
        batch=args.batch,
        records_per_bank=args.records_per_bank,
        seq_len=args.seq_len,
        lr=args.lr,
        central_lr=args.central_lr,
        epsilon=args.epsilon,
        delta=args.delta,
        clip_norm=args.clip_norm,
        seed=args.seed,
        keep_optimizer_state=args.keep_optimizer_state,
        server_opt=args.server_opt,
        server_lr=args.server_lr,
        server_lr_sqrt_n=args.server_lr_sqrt_n,
        server_momentum=args.server_momentum,
        server_beta2=args.server_beta2,
        server_tau=args.server_tau,
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
    result = experiment(opts)
    plot(result, args.plot)
    result["plot"] = str(args.plot)
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
