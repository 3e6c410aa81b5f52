"""One bank's side of a federated round, as plain functions over its state directory.

The Flower ClientApp (fedmoe/fl_client/app.py) is a thin shell over this module. With Flower's default
subprocess isolation a fresh process handles every message, so everything a bank must remember
between rounds lives in its state dir (DESIGN.md, "State on disk"):

    <state-root>/jobs/<job-id>/
        state.json             job id, layout hash, start hash, last applied round, rounds trained
        job.json               the run config the bank took part under (written once, by the bank)
        replica.safetensors    the trainable view of the global model after `applied_round`, and the
                               update rule's optimizer state (fedmoe.fl_client.fedopt): one atomic file
        released/round-NNNN.*  what the bank released for a round (re-sent, never re-trained)
        secagg/round-NNNN.json the round's secure-aggregation secrets (0600; fedmoe.fl_client.secagg_bank)
        deltas/round-NNNN.safetensors   plaintext deltas, only if the bank's policy says keep-plaintext-deltas (tests)
    <state-root>/privacy/<dataset fingerprint>/   (fedmoe.fl_client.privacy: shared by every job)
        ledger.jsonl, accountant.json

A train message, under the bank's round lock, in three steps: catch up (check key, decrypt,
validate and apply the aggregates not yet applied) -> a local round (the bank's policy decides
whether to train at all; DP-SGD from the global view; ledger entry before anything leaves) ->
seal the delta (clamped per coordinate, weight 1: the dataset size never leaves the bank) and reply.
Applying an aggregate is the job's update rule on the decrypted mean (Adam by default), computed
identically by every bank from the same state. `train_once` is that
sequence; an `Opener` and a `Sealer` say how aggregates are opened and the delta sealed: CKKS
here (`handle_train`), masks + BFV at the masked-input stage of secure aggregation
(fedmoe/fl_client/secagg_bank.py). The
replica stays at the global model: the bank's own local result is never kept, so every bank
applies exactly the same aggregates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import safe_open

from fedmoe.crypto import CkksKey, CryptoError, ExpectedHeader, decrypt_mean, encrypt_update, load_secret_context
from fedmoe.fl_client.aggregate_check import AggregateRejected, check_aggregate
from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.fedopt import FedOptimizer, FedOptState, fed_step, update_clamp
from fedmoe.fl_client.policy import BankPolicy
from fedmoe.fl_client.privacy import BankPrivacy, RoundResult
from fedmoe.fl_client.state import atomic_save_tensors, load_tensors
from fedmoe.fl_client.task import BankData, build_model, load_bank_data, round_seed
from fedmoe.fl_client.train import TrainConfig, evaluate, train_local
from fedmoe.model.trainable import TrainableView
from fedmoe.protocol.config import RESUBMIT_MAY_CHANGE, JobConfig
from fedmoe.protocol.errors import ConfigError
from fedmoe.protocol.files import atomic_write_bytes, atomic_write_json, exclusive_lock, read_document, read_json
from fedmoe.protocol.messages import EvalReply, RoundRequest, TrainReply, TrainStatus

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
        self.optimizer = FedOptimizer.of(job)
        self.optimizer_state = FedOptState.fresh(self.view.numel)
        self.state_dir = config.job_dir(job.job_id)
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
            self.optimizer_state = FedOptState.from_tensors(saved, self.view.numel, source=str(self.replica_file))
            # The replica file is the commit point: the round it holds travels inside it, so a
            # crash between the replica and state.json can never make an aggregate apply twice.
            with safe_open(str(self.replica_file), framework="pt") as handle:
                state.applied_round = int((handle.metadata() or {}).get("applied_round", state.applied_round))
        return state

    def save(self) -> None:
        """Replica (with its applied round and optimizer state) first, then state.json; each write is atomic."""
        metadata = {"applied_round": str(self.state.applied_round), "job_id": self.job.job_id}
        tensors = dict(self.view.params)
        if self.optimizer.stateful:
            tensors |= self.optimizer_state.to_tensors()
        atomic_save_tensors(self.replica_file, tensors, metadata=metadata)
        atomic_write_json(self.state_file, asdict(self.state))

    # ---- round steps ---------------------------------------------------------------------------
    def apply_mean_delta(self, round_idx: int, mean_delta: torch.Tensor) -> None:
        """Moves the replica to the global model after `round_idx`; older rounds are no-ops.

        The replica moves by the job's update rule applied to the mean (fedmoe.fl_client.fedopt):
        the same state and the same mean give every bank the same bits. Rounds that ended with too
        few banks have no aggregate, so round numbers may skip.
        """
        if round_idx <= self.state.applied_round:
            return
        update, self.optimizer_state = fed_step(self.optimizer, self.optimizer_state, mean_delta)
        self.view.add_flat_(update)
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

    def releases_eval(self) -> bool:
        """The job asks for eval losses and the bank's policy lets them leave (they are not DP-protected).

        Under `eval-only-known-models` the loss leaves only for the consortium's signed aggregate: a
        secure-aggregation job (every aggregate opened only with its contributors' signed receipts)
        after at least one applied round. A CKKS aggregate can be any ciphertext the server made with
        the public key, and the round-0 model is the job's (the server's) checkpoint: the server could
        choose a model and read the bank's held-out loss on it, adaptively (issue 26).
        """
        policy = self.config.policy
        if not (self.job.evaluate and "eval-loss" in policy.release_metrics):
            return False
        known = self.job.aggregation == "secagg" and self.state.applied_round >= 1
        if policy.eval_only_known_models and not known:
            logger.info("bank %s: no eval loss for a model the server could have chosen (eval-only-known-models)",
                        self.config.bank_id)  # fmt: skip
            return False
        return True

    def start_eval(self, data: BankData) -> dict[str, float]:
        """The held-out loss of the model the bank starts a round from (the global model after its
        applied round), sent with the train reply: one exchange per round instead of a second one.

        Its duration stays in the bank's log: it grows with the held-out set, so it would tell the
        server the dataset's size. A failed evaluation costs the loss, never the round.
        """
        if not self.releases_eval():
            return {}
        started = time.perf_counter()
        try:
            loss = self.eval_loss(data)
        except Exception:  # noqa: BLE001 - the round goes on without the loss
            logger.exception("bank %s: evaluating the global model failed", self.config.bank_id)
            return {}
        logger.info("bank %s: eval loss %.4f after round %d (%.1f s)", self.config.bank_id, loss,
                    self.state.applied_round, time.perf_counter() - started)  # fmt: skip
        return {"eval-loss": loss}

    def keep_delta(self, round_idx: int, delta: torch.Tensor, weight: float) -> None:
        """Debug/test only (the bank policy's keep-plaintext-deltas): its own plaintext delta, never sent."""
        path = self.state_dir / "deltas" / f"round-{round_idx:04d}.safetensors"
        atomic_save_tensors(path, {"delta": delta, "weight": torch.tensor([weight], dtype=torch.float64)})

    def reply(self, round_idx: int, status: TrainStatus, **fields) -> TrainReply:
        return TrainReply(
            bank_id=self.config.bank_id,
            round=round_idx,
            status=status,
            applied_round=self.state.applied_round,
            start_hash=self.state.start_hash,
            **fields,
        )

    def mark_attempt(self, round_idx: int) -> None:
        atomic_write_bytes(self.state_dir / "attempts" / f"round-{round_idx:04d}", b"")

    def attempted_rounds(self) -> set[int]:
        return {int(p.name.split("-")[1]) for p in (self.state_dir / "attempts").glob("round-*")}

    # ---- what was released: a repeated request gets it again, never a second training --------
    def released_file(self, round_idx: int, suffix: str) -> Path:
        return self.state_dir / "released" / f"round-{round_idx:04d}.{suffix}"

    def keep_release(self, reply: TrainReply, binding: str) -> None:
        """`binding`: what the release is valid for (secagg: the round keys it was masked under)."""
        meta = {"metrics": reply.metrics, "ledger_commitment": reply.ledger_commitment, "binding": binding}
        atomic_write_bytes(self.released_file(reply.round, "bundle"), reply.bundle)
        atomic_write_json(self.released_file(reply.round, "json"), meta)

    def released_reply(self, round_idx: int, binding: str) -> TrainReply | None:
        """The kept release of a round; ALREADY_RELEASED when it was bound to other round keys."""
        if round_idx not in self.state.rounds_trained or not self.released_file(round_idx, "json").exists():
            return None
        meta = read_json(self.released_file(round_idx, "json"))
        kept_binding = meta.pop("binding", "")
        if kept_binding != binding:
            logger.warning(
                "bank %s: round %d was released under other round keys; sitting out", self.config.bank_id, round_idx
            )
            reason = f"round {round_idx} was already released under other round keys: not trained or masked again"
            return self.reply(round_idx, TrainStatus.ALREADY_RELEASED, reason=reason, **meta)
        logger.warning("bank %s: round %d was already released; re-sending it", self.config.bank_id, round_idx)
        bundle = self.released_file(round_idx, "bundle").read_bytes()
        return self.reply(round_idx, TrainStatus.OK, bundle=bundle, **meta)


class Opener(Protocol):
    """Decrypts one stored aggregate for a bank: (mean update float32, total weight); CryptoError if it cannot."""

    def __call__(self, round_idx: int, blob: bytes, view: TrainableView) -> tuple[np.ndarray, float]: ...


class Sealer(Protocol):
    """Turns a bank's delta into what leaves it (CKKS ciphertext, or a secagg masked input)."""

    binding: str  # what a kept release is valid for ("" = any repeat of the round)

    def check(self, bank: Bank) -> None: ...  # before training: raise if the release could not be made
    def seal(self, bank: Bank, round_idx: int, delta: torch.Tensor) -> bytes: ...


# ---- step 1: catch up ------------------------------------------------------------------------------
def check_job(job: JobConfig, config: BankConfig, request: RoundRequest) -> None:
    request.check_job(job.job_id, config.bank_id)
    record_job(job, config)


# ---- the bank's own record of its job -------------------------------------------------------------
JOB_RECORD = "job.json"  # in <state-root>/jobs/<job-id>/, beside state.json and the replica


def job_record_path(state_root: Path, job_id: str) -> Path:
    return state_root / "jobs" / job_id / JOB_RECORD


def job_changes(recorded: JobConfig, job: JobConfig) -> list[str]:
    """`key: recorded -> job` for every run-config key but those a resubmission may change."""
    old, new = recorded.to_run_config(), job.to_run_config()
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old) if k not in RESUBMIT_MAY_CHANGE and old[k] != new[k]]


def read_job_record(path: Path) -> JobConfig:
    """A bank's record of its job (what `record_job` wrote); a missing or bad file raises ConfigError."""
    raw = read_document(path, ConfigError, missing="no record of this job at the bank (it writes one when it "
                        "first trains or applies an aggregate of the job)")  # fmt: skip
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object (a run config), got {type(raw).__name__}")
    try:
        return JobConfig.from_run_config(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def record_job(job: JobConfig, config: BankConfig) -> Path:
    """The run config this bank takes part in the job under, written by the bank itself the first time
    a message of the job reaches its state (what fedmoe-export reads at the bank: no server file needed).

    Written once: every later message must carry the same job (but for RESUBMIT_MAY_CHANGE),
    so a server can never change what the bank believes it trained.

    Raises:
        ConfigError: the message's run config differs from the bank's record (names the keys).
    """
    path = job_record_path(config.state_root, job.job_id)
    if not path.exists():
        return atomic_write_json(path, job.to_run_config())
    changed = job_changes(read_job_record(path), job)
    if changed:
        raise ConfigError(
            f"{path}: bank {config.bank_id} took part in job {job.job_id!r} under this run config; the message's "
            f"run config changes {changed}: refused (a job's config cannot change under it; use a new job-id)"
        )
    return path


def ckks_key(job: JobConfig, config: BankConfig, request: RoundRequest) -> CkksKey:
    """The bank's secret CKKS context, checked against the key the server names."""
    check_job(job, config, request)
    key = load_secret_context(config.key_path)
    if (request.key_id, request.key_epoch) != (key.key_id, key.epoch):
        raise ConfigError(
            f"bank {config.bank_id}: the server uses key {request.key_id[:12]} epoch {request.key_epoch}, "
            f"this bank holds {key.key_id[:12]} epoch {key.epoch}"
        )
    return key


def ckks_opener(key: CkksKey) -> Opener:
    def open_ckks(round_idx: int, blob: bytes, view: TrainableView) -> tuple[np.ndarray, float]:
        expected = ExpectedHeader(key.key_id, key.epoch, round_idx, view.layout_hash, view.numel)
        return decrypt_mean(blob, key, expected=expected)

    return open_ckks


def open_bank(job: JobConfig, config: BankConfig, request: RoundRequest, opener: Opener) -> Bank:
    """Loads the bank, then decrypts, validates and applies the aggregates it lacks.

    Raises:
        AggregateRejected: an aggregate failed decryption or validation; nothing of it was applied.
    """
    check_job(job, config, request)
    bank = Bank(job, config)
    for round_idx in sorted(request.aggregates):
        if round_idx <= bank.state.applied_round:
            continue
        try:
            mean, total_weight = opener(round_idx, request.aggregates[round_idx], bank.view)
        except CryptoError as err:
            raise AggregateRejected(round_idx, f"cannot decrypt: {err}") from None
        check_aggregate(job, round_idx, mean, total_weight)
        bank.apply_mean_delta(round_idx, torch.from_numpy(mean))
    return bank


# ---- step 2: the local round ----------------------------------------------------------------------
def local_round(bank: Bank, data: BankData, round_idx: int) -> RoundResult:
    """The bank's policy decides whether this job may train here at all; then DP-SGD (or a refusal)."""
    privacy = BankPrivacy(bank.job, bank.config, data)
    privacy.record_missed(round_idx, bank.attempted_rounds())
    refusals = privacy.policy_refusals()
    if refusals:
        return privacy.refuse(round_idx, refusals)
    if not bank.job.dp:  # the policy allows it (allow-no-dp): on the record as non-private
        return privacy.record_non_private(round_idx, bank.train_plain(data, round_idx))
    return privacy.train(bank.model, data, round_idx)


# ---- step 3: seal (encrypt, or mask and encrypt) and reply -------------------------------------------
class CkksSealer:
    """The shared-key path: the delta CKKS-encrypted with weight 1."""

    binding = ""

    def __init__(self, key: CkksKey) -> None:
        self.key = key

    def check(self, bank: Bank) -> None:
        return None

    def seal(self, bank: Bank, round_idx: int, delta: torch.Tensor) -> bytes:
        return encrypt_update(
            delta.numpy(), weight=1.0, key=self.key, round=round_idx, layout_hash=bank.view.layout_hash,
            bank_id=bank.config.bank_id,
        )  # fmt: skip


def seal_and_reply(
    bank: Bank, sealer: Sealer, round_idx: int, global_flat: torch.Tensor, result: RoundResult
) -> TrainReply:
    """Seals the delta (weight 1 per bank), resets the replica, persists, replies.

    Under adam/sgdm the delta is clamped per coordinate to `update_clamp` (post-processing of the
    DP output), so the aggregate check's bound holds for every honest mean.
    """
    delta = bank.view.flatten() - global_flat
    if bank.optimizer.stateful:
        bound = update_clamp(bank.job)
        delta = delta.clamp(-bound, bound)
    bank.view.load_flat_(global_flat)  # the replica stays at the global model
    started = time.perf_counter()
    bundle = sealer.seal(bank, round_idx, delta)
    result.metrics["seconds-encrypt"] = time.perf_counter() - started
    if bank.config.policy.keep_plaintext_deltas:  # the bank's policy only, never the job (issue 27)
        bank.keep_delta(round_idx, delta, 1.0)
    metrics = released_metrics(bank.config.policy, result.metrics)
    reply = bank.reply(round_idx, TrainStatus.OK, bundle=bundle, metrics=metrics, ledger_commitment=result.commitment)
    bank.keep_release(reply, sealer.binding)  # before state.json says "trained": a repeat request re-sends this
    bank.state.rounds_trained.append(round_idx)
    bank.save()
    logger.info("bank %s round %d: %s", bank.config.bank_id, round_idx, result.metrics)
    return reply


def released_metrics(policy: BankPolicy, metrics: dict[str, float]) -> dict[str, float]:
    """Train and seal timings always; loss values only where the bank's policy releases them (not DP-protected)."""
    return {k: v for k, v in metrics.items() if k in RELEASED_TIMINGS or k in policy.release_metrics}


# Timings that do not grow with the dataset (Poisson batches have the same expected size whatever n).
RELEASED_TIMINGS = ("seconds-train", "seconds-encrypt")


def train_once(job: JobConfig, config: BankConfig, request: RoundRequest, opener: Opener, sealer: Sealer) -> TrainReply:
    """Catch up, local round, seal, persist. The caller holds the bank's round lock."""
    try:
        bank = open_bank(job, config, request, opener)
    except AggregateRejected as err:
        logger.error("bank %s: %s", config.bank_id, err)
        bank = Bank(job, config)  # as it was: nothing of the rejected aggregate was applied
        return bank.reply(request.round, TrainStatus.AGGREGATE_REJECTED, reason=str(err), rejected_round=err.round)
    repeat = bank.released_reply(request.round, sealer.binding)
    if repeat is not None:
        return repeat
    sealer.check(bank)  # a release that cannot be made is refused before any budget is spent
    bank.mark_attempt(request.round)  # a crash from here on is recorded as "failed" next time
    if request.round <= bank.state.applied_round:
        raise ConfigError(
            f"bank {config.bank_id}: asked to train round {request.round}, but it already applied that "
            f"round's aggregate (applied round {bank.state.applied_round}); the server's state is behind"
        )
    data = load_bank_data(job, config, bank.model.config.vocab_size)
    start_metrics = bank.start_eval(data)  # before training: the loss of the global model it applied
    global_flat = bank.view.flatten()
    started = time.perf_counter()
    result = local_round(bank, data, request.round)
    if result.refused:
        bank.save()  # (only the aggregates it applied)
        return bank.reply(
            request.round, TrainStatus.REFUSED, reason=result.refused, ledger_commitment=result.commitment,
            metrics=released_metrics(config.policy, start_metrics),
        )  # fmt: skip
    result.metrics["seconds-train"] = time.perf_counter() - started
    result.metrics.update(start_metrics)
    return seal_and_reply(bank, sealer, request.round, global_flat, result)


def handle_train(job: JobConfig, config: BankConfig, request: RoundRequest) -> TrainReply:
    """One CKKS train message, one at a time per bank: catch up, local round, encrypt, persist."""
    with exclusive_lock(config.lock_file):  # budget check -> train -> ledger -> release, never interleaved
        key = ckks_key(job, config, request)
        return train_once(job, config, request, ckks_opener(key), CkksSealer(key))


def handle_evaluate(
    job: JobConfig, config: BankConfig, request: RoundRequest, opener: Opener | None = None
) -> EvalReply:
    """The closing message: catch up on aggregates; the eval loss leaves only if the policy says so.

    `opener`: how to open the aggregates (default: the CKKS key; secure aggregation passes its own).
    """
    with exclusive_lock(config.lock_file):
        try:
            bank = open_bank(job, config, request, opener or ckks_opener(ckks_key(job, config, request)))
        except AggregateRejected as err:  # a typed answer: the server quarantines what most banks reject
            logger.error("bank %s: %s", config.bank_id, err)
            applied = Bank(job, config).state.applied_round
            return EvalReply(config.bank_id, request.round, applied, rejected_round=err.round, reason=str(err))
        bank.save()
    data = load_bank_data(job, config, bank.model.config.vocab_size) if bank.releases_eval() else None
    return EvalReply(
        bank_id=config.bank_id,
        round=request.round,
        applied_round=bank.state.applied_round,
        eval_loss=bank.eval_loss(data) if data is not None else None,
    )
