"""One bank's side of a federated round, as plain functions over its state directory.

The Flower ClientApp (fl_client/app.py) is a thin shell over this module. With Flower's default
subprocess isolation a fresh process handles every message, so everything a bank must remember
between rounds lives in its state dir (DESIGN.md, "State on disk"):

    state.json             job id, layout hash, start hash, last applied round, rounds trained
    replica.safetensors    the trainable view of the global model after `applied_round`
    accountant.json        DP accountant history (only rounds this bank trained in)
    ledger.jsonl           hash-chained privacy ledger (protocol.ledger)
    deltas/round-NNNN.safetensors   plaintext deltas, only with keep-plaintext-deltas (tests)

A train message, in three steps: catch up (check key, decrypt and apply the aggregates not yet
applied) -> a private round (budget check, DP-SGD from the global view, ledger entry before
anything leaves) -> encrypt w * delta with the sample weight w in an extra slot and reply. The
replica stays at the global model: the bank's own local result is never kept, so every bank
applies exactly the same aggregates.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from crypto import CkksKey, ExpectedHeader, decrypt_mean, encrypt_update, load_secret_context
from fl_client.config import BankConfig
from fl_client.dp import AccountantState, BudgetExceeded, DPConfig, DPError, HistoryEntry, train_private_round
from fl_client.dp.accountant import noise_multiplier_for, sample_rate_for
from fl_client.ledger import accountant_state_from_ledger, round_entry
from fl_client.state import atomic_save_tensors, load_tensors
from fl_client.task import BankData, build_model, dp_config, load_bank_data, round_seed
from fl_client.train import TrainConfig, evaluate, train_local
from model.trainable import TrainableView
from protocol.config import JobConfig
from protocol.errors import ConfigError
from protocol.files import atomic_write_json, read_json
from protocol.ledger import Ledger, skipped_rounds, utc_now
from protocol.messages import EvalReply, RoundRequest, TrainReply, TrainStatus

logger = logging.getLogger(__name__)


@dataclass
class BankState:
    job_id: str
    bank_id: str
    layout_hash: str
    start_hash: str
    applied_round: int = 0
    rounds_trained: list[int] = field(default_factory=list)


class Bank:
    """A bank's replica, data and state for one job; created afresh for every Flower message."""

    def __init__(self, job: JobConfig, config: BankConfig) -> None:
        self.job, self.config = job, config
        self.model = build_model(job)
        self.view = TrainableView(self.model)
        self.state_dir = config.state_dir
        self.state = self._load_or_init_state()

    # ---- state -------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def replica_file(self) -> Path:
        return self.state_dir / "replica.safetensors"

    def _load_or_init_state(self) -> BankState:
        start_hash = self.view.value_hash()
        if not self.state_file.exists():
            return BankState(self.job.job_id, self.config.bank_id, self.view.layout_hash, start_hash)
        state = BankState(**read_json(self.state_file))
        if state.job_id != self.job.job_id or state.bank_id != self.config.bank_id:
            raise ConfigError(
                f"{self.state_file}: belongs to job {state.job_id!r} bank {state.bank_id!r}, "
                f"this run is job {self.job.job_id!r} bank {self.config.bank_id!r}; use another state-dir"
            )
        if state.layout_hash != self.view.layout_hash:
            raise ConfigError(
                f"{self.state_file}: trainable layout {state.layout_hash[:12]} does not match the job's model "
                f"({self.view.layout_hash[:12]}): the job config changed under an existing state dir"
            )
        if self.replica_file.exists():
            saved = load_tensors(self.replica_file)
            flat = torch.cat([saved[spec.name].reshape(-1).float() for spec in self.view.specs])
            self.view.load_flat_(flat)
            # The replica file is the commit point: the round it holds travels inside it, so a
            # crash between the replica and state.json can never make an aggregate apply twice.
            with safe_open(str(self.replica_file), framework="pt") as handle:
                state.applied_round = int((handle.metadata() or {}).get("applied_round", state.applied_round))
        return state

    def save(self) -> None:
        """Replica (with its applied round) first, then state.json; each write is atomic."""
        metadata = {"applied_round": str(self.state.applied_round), "job_id": self.job.job_id}
        atomic_save_tensors(self.replica_file, dict(self.view.params), metadata=metadata)
        atomic_write_json(self.state_file, asdict(self.state))

    # ---- round steps ---------------------------------------------------------------------------
    def apply_mean_delta(self, round_idx: int, mean_delta: torch.Tensor) -> None:
        """Moves the replica to the global model after `round_idx`; older rounds are no-ops.

        Rounds that ended with too few banks have no aggregate, so round numbers may skip.
        """
        if round_idx <= self.state.applied_round:
            return
        self.view.add_flat_(mean_delta)
        self.state.applied_round = round_idx

    def train_plain(self, data: BankData, round_idx: int) -> dict[str, float]:
        """Non-private local training (job dp=false): debugging and the non-private baseline."""
        cfg = TrainConfig(
            steps=self.job.local_steps,
            batch_size=self.job.batch_size,
            lr=self.job.lr,
            seed=round_seed(self.job, self.config.bank_id, round_idx),
            balance_routing=False,  # the bias is part of the shared model: banks must not drift
        )
        result = train_local(self.model, data.train.inputs, data.train.targets, cfg)
        return {"train-loss": sum(result.losses[-5:]) / len(result.losses[-5:])}

    def eval_loss(self, data: BankData) -> float:
        return evaluate(self.model, data.held_out.inputs, data.held_out.targets)

    def keep_delta(self, round_idx: int, delta: torch.Tensor, weight: float) -> None:
        """Debug/test only (keep-plaintext-deltas): the bank's own plaintext delta, never sent."""
        path = self.state_dir / "deltas" / f"round-{round_idx:04d}.safetensors"
        atomic_save_tensors(path, {"delta": delta, "weight": torch.tensor([weight], dtype=torch.float64)})

    def reply(self, round_idx: int, status: TrainStatus, *, ledger: str = "", **fields) -> TrainReply:
        return TrainReply(
            bank_id=self.config.bank_id,
            round=round_idx,
            status=status,
            applied_round=self.state.applied_round,
            start_hash=self.state.start_hash,
            ledger_entry=ledger,
            **fields,
        )


@dataclass
class RoundResult:
    """What a bank's local round produced: metrics and its ledger entry, or why it refused."""

    metrics: dict[str, float] = field(default_factory=dict)
    ledger_entry: str = ""  # JSON of the stored ledger entry ("" without DP)
    refused: str = ""  # the reason, when the bank's own budget check said no


# ---- step 1: catch up ------------------------------------------------------------------------------
def open_bank(job: JobConfig, config: BankConfig, request: RoundRequest) -> tuple[Bank, CkksKey]:
    """Checks the request and key, loads the bank, and applies the aggregates it has not applied."""
    if request.job_id != job.job_id:
        raise ConfigError(f"bank {config.bank_id}: message for job {request.job_id!r}, run config says {job.job_id!r}")
    key = load_secret_context(config.key_path)
    if (request.key_id, request.key_epoch) != (key.key_id, key.epoch):
        raise ConfigError(
            f"bank {config.bank_id}: server uses key {request.key_id[:12]} epoch {request.key_epoch}, "
            f"this bank holds {key.key_id[:12]} epoch {key.epoch} ({config.key_path})"
        )
    bank = Bank(job, config)
    for round_idx in sorted(request.aggregates):
        if round_idx <= bank.state.applied_round:
            continue
        expected = ExpectedHeader(key.key_id, key.epoch, round_idx, bank.view.layout_hash, bank.view.numel)
        mean, _total_weight = decrypt_mean(request.aggregates[round_idx], key, expected=expected)
        bank.apply_mean_delta(round_idx, torch.from_numpy(mean))
    return bank, key


# ---- step 2: the private round -----------------------------------------------------------------------
class BankLedger:
    """The bank's ledger, read once per message, and the entries it appends for this bank."""

    def __init__(self, bank: Bank, cfg: DPConfig, n_samples: int) -> None:
        self.ledger = Ledger(bank.state_dir / "ledger.jsonl")
        self.entries = self.ledger.entries()
        self.job_id, self.cfg, self.n_samples = bank.job.job_id, cfg, n_samples

    def accountant(self, state_dir: Path) -> AccountantState:
        """The accountant; after a crash between ledger append and accountant save, the ledger wins."""
        accountant = load_accountant(state_dir, self.cfg)
        from_ledger = accountant_state_from_ledger(self.entries, self.cfg)
        if from_ledger is not None and len(from_ledger.history) > len(accountant.history):
            return from_ledger
        return accountant

    def append(self, round_idx: int, status: str, state: AccountantState, **details) -> dict:
        entry = round_entry(
            job_id=self.job_id,
            bank_id=self.cfg.bank_id,
            round=round_idx,
            status=status,
            cfg=self.cfg,
            n_samples=self.n_samples,
            budget_epsilon=self.cfg.target_epsilon,
            state=state,
            **({"report": None} | details),
        )
        return self.ledger.append(entry)

    def record_skipped(self, upcoming_round: int, state: AccountantState) -> None:
        for skipped in skipped_rounds(self.entries, upcoming_round):  # rounds it never heard of
            self.append(skipped, "skipped", state, reason="the bank was not asked to train in this round")


def planned_round(cfg: DPConfig, n_samples: int) -> HistoryEntry | None:
    """The mechanism a refused round would have run (None when no noise can meet the budget)."""
    try:
        return HistoryEntry(noise_multiplier_for(cfg, n_samples), sample_rate_for(cfg, n_samples), cfg.local_steps)
    except DPError:
        return None


def private_round(bank: Bank, data: BankData, round_idx: int) -> RoundResult:
    """DP-SGD from the global view; the privacy spent is in the ledger before anything leaves."""
    cfg = dp_config(bank.job, bank.config)
    ledger = BankLedger(bank, cfg, len(data.train))
    accountant = ledger.accountant(bank.state_dir)
    ledger.record_skipped(round_idx, accountant)
    seed = None if bank.job.secure_mode else round_seed(bank.job, bank.config.bank_id, round_idx)
    started_at = utc_now()
    try:
        report = train_private_round(bank.model, data.train, cfg, accountant, seed=seed)
    except BudgetExceeded as err:  # nothing trained, nothing spent; the refusal is on the record
        planned = planned_round(cfg, len(data.train))
        stored = ledger.append(round_idx, "refused", accountant, reason=str(err), planned=planned)
        return RoundResult(ledger_entry=json.dumps(stored), refused=str(err))
    # What one more identical round would bring epsilon to: the server stops selecting a bank
    # whose next round cannot fit (the bank would refuse it anyway).
    epsilon_next = report.accountant_state.appended(HistoryEntry(report.sigma, report.q, report.steps)).epsilon()
    # Ledger first, then accountant: a crash can over-count, never under-count.
    stored = ledger.append(
        round_idx, "trained", None, report=report, epsilon_next_round=epsilon_next, started_at=started_at
    )
    report.accountant_state.save(bank.state_dir / "accountant.json")
    metrics = {
        "epsilon-next": epsilon_next,
        "train-loss": report.mean_loss,
        "epsilon-round": report.epsilon_spent_this_round,
        "epsilon-total": report.epsilon_total,
        "epsilon-budget": report.target_epsilon,
        "sigma": report.sigma,
        "sample-rate": report.q,
        "steps": float(report.steps),
    }
    return RoundResult(metrics=metrics, ledger_entry=json.dumps(stored))


# ---- step 3: encrypt and reply ----------------------------------------------------------------------
def encrypt_and_reply(
    bank: Bank, key: CkksKey, data: BankData, round_idx: int, global_flat: torch.Tensor, result: RoundResult
) -> TrainReply:
    """Encrypts w * delta (w = sample count, encrypted too), resets the replica, persists, replies."""
    delta = bank.view.flatten() - global_flat
    bank.view.load_flat_(global_flat)  # the replica stays at the global model
    started = time.perf_counter()
    weight = float(len(data.train))  # sample count: encrypted, so the server never learns it
    bundle = encrypt_update(
        delta.numpy(), weight=weight, key=key, round=round_idx, layout_hash=bank.view.layout_hash,
        bank_id=bank.config.bank_id,
    )  # fmt: skip
    result.metrics["seconds-encrypt"] = time.perf_counter() - started
    if bank.job.keep_plaintext_deltas:
        bank.keep_delta(round_idx, delta, weight)
    bank.state.rounds_trained.append(round_idx)
    bank.save()
    logger.info("bank %s round %d: %s", bank.config.bank_id, round_idx, result.metrics)
    return bank.reply(round_idx, TrainStatus.OK, bundle=bundle, metrics=result.metrics, ledger=result.ledger_entry)


def handle_train(job: JobConfig, config: BankConfig, request: RoundRequest) -> TrainReply:
    """One train message: catch up, train privately (or refuse), encrypt w * delta, persist."""
    bank, key = open_bank(job, config, request)
    if request.round <= bank.state.applied_round:
        raise ConfigError(
            f"bank {config.bank_id}: asked to train round {request.round}, but it already applied that "
            f"round's aggregate (applied round {bank.state.applied_round}); the server's state is behind"
        )
    data = load_bank_data(job, config, bank.model.config.vocab_size)
    global_flat = bank.view.flatten()
    started = time.perf_counter()
    result = private_round(bank, data, request.round) if job.dp else RoundResult(bank.train_plain(data, request.round))
    if result.refused:
        bank.save()  # (only the aggregates it applied)
        return bank.reply(request.round, TrainStatus.REFUSED, reason=result.refused, ledger=result.ledger_entry)
    result.metrics["seconds-train"] = time.perf_counter() - started
    return encrypt_and_reply(bank, key, data, request.round, global_flat, result)


def handle_evaluate(job: JobConfig, config: BankConfig, request: RoundRequest) -> EvalReply:
    """One evaluate message: catch up on aggregates, report eval loss on held-out data."""
    bank, _key = open_bank(job, config, request)
    bank.save()
    data = load_bank_data(job, config, bank.model.config.vocab_size)
    return EvalReply(
        bank_id=config.bank_id,
        round=request.round,
        applied_round=bank.state.applied_round,
        eval_loss=bank.eval_loss(data),
        n_eval=len(data.held_out),
    )


def load_accountant(state_dir: Path, cfg: DPConfig) -> AccountantState:
    path = state_dir / "accountant.json"
    if not path.exists():
        return AccountantState.fresh(cfg)
    state = AccountantState.from_json(path.read_text(encoding="utf-8"), source=str(path))
    state.check_matches(cfg)
    return state
