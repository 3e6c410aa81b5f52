"""One bank's side of a federated round, as plain functions over its state directory.

The Flower ClientApp (fl_client/app.py) is a thin shell over this module. With Flower's default
subprocess isolation a fresh process handles every message, so everything a bank must remember
between rounds lives in its state dir (DESIGN.md, "State on disk"):

    state.json             job id, layout hash, start hash, last applied round, rounds trained
    replica.safetensors    the trainable view of the global model after `applied_round`
    accountant.json        DP accountant history (only rounds this bank trained in)
    ledger.jsonl           hash-chained privacy ledger (fl_client.ledger)
    deltas/round-NNNN.safetensors   plaintext deltas, only with keep-plaintext-deltas (tests)

A round: check key and budget -> decrypt and apply the aggregates not yet applied -> train
locally (DP-SGD) from the global view -> delta = local - global -> encrypt w * delta with the
sample weight w in an extra slot -> reply. The replica stays at the global model: the bank's
own local result is never kept, so every bank applies exactly the same aggregates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from crypto import CkksKey, ExpectedHeader, decrypt_mean, encrypt_update, load_secret_context
from fl_client.config import BankConfig, JobConfig
from fl_client.data import (
    PackedData,
    generate_bank_corpus,
    load_text_file,
    make_bank_profiles,
    pack_records,
    train_eval_split,
)
from fl_client.dp import AccountantState, BudgetExceeded, DPConfig, HistoryEntry, train_private_round
from fl_client.errors import ConfigError
from fl_client.ledger import Ledger, accountant_state_from_ledger, round_entry, skipped_rounds, utc_now
from fl_client.messages import TRAIN_STATUS_OK, TRAIN_STATUS_REFUSED, EvalReply, RoundRequest, TrainReply
from fl_client.state import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from fl_client.train import TrainConfig, evaluate, train_local
from model.checkpoint import load_pretrained
from model.deepseek import DeepseekForCausalLM, preset
from model.lora import LoraConfig, configure_trainable
from model.tokenizer import load_tokenizer
from model.trainable import TrainableView

logger = logging.getLogger(__name__)


@dataclass
class BankState:
    job_id: str
    bank_id: str
    layout_hash: str
    start_hash: str
    applied_round: int = 0
    rounds_trained: list[int] = field(default_factory=list)


def build_model(job: JobConfig) -> DeepseekForCausalLM:
    """The job's base model with its trainable view configured: identical at every bank."""
    if job.base_checkpoint:
        model = load_pretrained(job.base_checkpoint)
    else:
        torch.manual_seed(job.seed)  # seeded init: every bank builds the same weights
        model = DeepseekForCausalLM(preset(job.model_preset))
    lora = LoraConfig(rank=job.lora_rank, alpha=job.lora_alpha, seed=job.seed)
    return configure_trainable(model, job.train_mode, lora)


@dataclass
class BankData:
    train: PackedData  # one privacy unit (record or customer) per sample
    held_out: PackedData
    source: str


def load_bank_data(job: JobConfig, bank: BankConfig, vocab_size: int) -> BankData:
    """The bank's records -> packed train/eval samples (one record or customer per sample)."""
    tokenizer = load_tokenizer(job.base_checkpoint or None)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids, model vocab_size is {vocab_size}")
    if bank.data_path is not None:
        records = load_text_file(bank.data_path)
        source = str(bank.data_path)
    else:
        profiles = make_bank_profiles(job.synthetic_banks, seed=job.seed)
        if not 0 <= bank.partition_id < len(profiles):
            raise ConfigError(
                f"node config of {bank.bank_id}: 'partition-id' expected 0..{len(profiles) - 1} "
                f"(synthetic-banks={job.synthetic_banks}), got {bank.partition_id}"
            )
        profile = profiles[bank.partition_id]
        records = generate_bank_corpus(profile, job.records_per_bank, seed=job.seed)
        source = f"synthetic {profile.bank_id} ({profile.locale})"
    train, held_out = train_eval_split(
        records, eval_fraction=job.eval_fraction, seed=job.seed, privacy_unit=job.privacy_unit
    )
    pack = dict(
        encode=tokenizer.encode,
        seq_len=job.seq_len,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        privacy_unit=job.privacy_unit,
    )
    return BankData(pack_records(train, **pack), pack_records(held_out, **pack), source)


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


def round_seed(job: JobConfig, bank_id: str, round_idx: int) -> int:
    """Reproducible per-(job, bank, round) seed for simulations; secure_mode uses no seed at all."""
    digest = hashlib.sha256(f"{job.job_id}|{job.seed}|{bank_id}|{round_idx}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def trainable_layout(job: JobConfig) -> tuple[str, int, str]:
    """(layout hash, element count, start value hash) of the job's trainable view.

    Every bundle must carry the layout; every bank must start from the same values.
    """
    view = TrainableView(build_model(job))
    return view.layout_hash, view.numel, view.value_hash()


def dp_config(job: JobConfig, bank: BankConfig) -> DPConfig:
    """The bank's DP settings: its own budget (node config) + the job's training shape."""
    return DPConfig(
        target_epsilon=bank.epsilon,
        delta=bank.delta,
        clip_norm=job.clip_norm,
        planned_rounds=bank.planned_rounds or job.num_rounds,
        local_steps=job.local_steps,
        expected_batch_size=job.batch_size,
        physical_batch_size=job.batch_size,
        accountant=job.accountant,
        grad_sample_mode=job.grad_sample_mode,
        privacy_unit=job.privacy_unit,
        secure_mode=job.secure_mode,
        lr=job.lr,
        bank_id=bank.bank_id,
    )


def _open_bank(job: JobConfig, config: BankConfig, request: RoundRequest) -> tuple[Bank, CkksKey]:
    """Checks the request, loads the bank and its key, and applies the pending aggregates."""
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


def handle_train(job: JobConfig, config: BankConfig, request: RoundRequest) -> TrainReply:
    """One train message: catch up, check budget, train (DP-SGD), encrypt w * delta, persist."""
    bank, key = _open_bank(job, config, request)
    if request.round <= bank.state.applied_round:
        raise ConfigError(
            f"bank {config.bank_id}: asked to train round {request.round}, but it already applied that "
            f"round's aggregate (applied round {bank.state.applied_round}); the server's state is behind"
        )
    data = load_bank_data(job, config, bank.model.config.vocab_size)
    global_flat = bank.view.flatten()
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    ledger_entry = ""
    if job.dp:
        cfg = dp_config(job, config)
        accountant = load_accountant(bank.state_dir, cfg)
        ledger = Ledger(bank.state_dir / "ledger.jsonl")
        from_ledger = accountant_state_from_ledger(ledger.entries(), cfg)
        if from_ledger is not None and len(from_ledger.history) > len(accountant.history):
            accountant = from_ledger  # a crash between ledger append and accountant save: trust the ledger
        n_samples = len(data.train)
        for skipped in skipped_rounds(ledger.entries(), request.round):  # rounds it never heard of
            ledger.append(
                round_entry(
                    job_id=job.job_id,
                    bank_id=config.bank_id,
                    round=skipped,
                    status="skipped",
                    report=None,
                    cfg=cfg,
                    n_samples=n_samples,
                    budget_epsilon=cfg.target_epsilon,
                    state=accountant,
                    reason="the bank was not asked to train in this round",
                )
            )
        seed = None if job.secure_mode else round_seed(job, config.bank_id, request.round)
        started_at = utc_now()
        try:
            report = train_private_round(bank.model, data.train, cfg, accountant, seed=seed)
        except BudgetExceeded as err:
            # Nothing trained, nothing spent: model, accountant and ledger stay as they were;
            # the refusal reaches the server's ledger mirror through the reply.
            bank.save()  # (only the aggregates it applied)
            return TrainReply(
                bank_id=config.bank_id,
                round=request.round,
                status=TRAIN_STATUS_REFUSED,
                applied_round=bank.state.applied_round,
                start_hash=bank.state.start_hash,
                reason=str(err),
            )
        # What one more identical round would bring epsilon to: the server stops selecting a bank
        # whose next round cannot fit (the bank would refuse it anyway).
        epsilon_next = report.accountant_state.appended(HistoryEntry(report.sigma, report.q, report.steps)).epsilon()
        # Privacy spent is recorded (ledger, then accountant) before anything derived from the
        # data leaves the bank: a crash can over-count, never under-count.
        stored = ledger.append(
            round_entry(
                job_id=job.job_id,
                bank_id=config.bank_id,
                round=request.round,
                status="trained",
                report=report,
                cfg=cfg,
                n_samples=n_samples,
                budget_epsilon=cfg.target_epsilon,
                epsilon_next_round=epsilon_next,
                started_at=started_at,
            )
        )
        ledger_entry = json.dumps(stored)
        report.accountant_state.save(bank.state_dir / "accountant.json")
        metrics.update(
            {
                "epsilon-next": epsilon_next,
                "train-loss": report.mean_loss,
                "epsilon-round": report.epsilon_spent_this_round,
                "epsilon-total": report.epsilon_total,
                "epsilon-budget": report.target_epsilon,
                "sigma": report.sigma,
                "sample-rate": report.q,
                "steps": float(report.steps),
            }
        )
    else:
        metrics.update(bank.train_plain(data, request.round))
    metrics["seconds-train"] = time.perf_counter() - started
    delta = bank.view.flatten() - global_flat
    bank.view.load_flat_(global_flat)  # the replica stays at the global model

    started = time.perf_counter()
    weight = float(len(data.train))  # sample count: encrypted, so the server never learns it
    bundle = encrypt_update(
        delta.numpy(),
        weight=weight,
        key=key,
        round=request.round,
        layout_hash=bank.view.layout_hash,
        bank_id=config.bank_id,
    )
    metrics["seconds-encrypt"] = time.perf_counter() - started
    if job.keep_plaintext_deltas:
        bank.keep_delta(request.round, delta, weight)
    bank.state.rounds_trained.append(request.round)
    bank.save()
    logger.info("bank %s round %d: %s", config.bank_id, request.round, metrics)
    return TrainReply(
        bank_id=config.bank_id,
        round=request.round,
        status=TRAIN_STATUS_OK,
        applied_round=bank.state.applied_round,
        start_hash=bank.state.start_hash,
        bundle=bundle,
        metrics=metrics,
        ledger_entry=ledger_entry,
    )


def handle_evaluate(job: JobConfig, config: BankConfig, request: RoundRequest) -> EvalReply:
    """One evaluate message: catch up on aggregates, report eval loss on held-out data."""
    bank, _key = _open_bank(job, config, request)
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
