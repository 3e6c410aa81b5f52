"""One bank's side of a secure-aggregation round (docs/secagg.md): one function per Flower exchange.

Every stage runs under the bank's round lock. The bank's executor keeps its process between
messages, but nothing of a round lives only in memory (the executor may restart between two
stages): the round's secrets (`BankSecAgg.state_dict()`: X25519 keys, self-mask seed, shares held
for peers) live in `<state-root>/jobs/<job>/secagg/round-NNNN.json` (mode 0600), deleted once the
bank has answered the unmask stage (or when a later round starts). Requests may carry the next
round's first stages (`RoundRequest.secagg_next`): with the masked-input request its setup (the
bank advertises that round's keys after masking, `advertise_ahead`), with the unmask order its
share-keys request (the bank shares those keys after unmasking, `share_ahead`). Neither ever fails
the stage that carries it. The bank trains exactly once per round, at the
masked-input stage, through fedmoe.fl_client.bank.train_once (catch up, policy, DP-SGD, ledger entry
first), masks `[1 * delta..., 1]` (weight 1: its dataset size never leaves it) and keeps the
masked input for re-sending. A kept masked input is bound to the round keys it was masked under:
after a server restart (a new advertise, fresh keys) the bank sits the round out
(ALREADY_RELEASED) rather than train twice or re-mask the same update.

Key material, all in the folder of the node-config's `key-path` (the bank's own key folder):
    context.secret.bfv        the job's BFV secret context (mode 0600)
    <bank-id>.identity.secret the bank's Ed25519 identity key (mode 0600)
    pins.json                 the consortium's pinned identity keys (public)
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import ConsortiumPins, Identity, load_identity, load_pins
from fedmoe.crypto.secagg.accountability import verdict
from fedmoe.crypto.secagg.bank import BankSecAgg, open_aggregate
from fedmoe.crypto.secagg.bfv import SECRET_FILE as BFV_SECRET_FILE
from fedmoe.crypto.secagg.bfv import BfvKey
from fedmoe.crypto.secagg.bfv_secret import load_bfv_secret
from fedmoe.crypto.secagg.messages import (
    AccuseRequest,
    MaskedInputRequest,
    QuarantineEvidence,
    RoundSetup,
    SecureAggregate,
    ShareKeysRequest,
    UnmaskOrder,
    UnmaskRequest,
)
from fedmoe.fl_client.config import BankConfig
from fedmoe.protocol.config import PINS_FILE, JobConfig
from fedmoe.protocol.errors import ConfigError
from fedmoe.protocol.files import atomic_write_json, exclusive_lock, read_json
from fedmoe.protocol.messages import (
    EvalReply,
    RoundRequest,
    SecAggStage,
    TrainReply,
    TrainStatus,
    identify_statement,
    unpack_secagg_result,
)

if TYPE_CHECKING:  # the stages other than masked input run without torch
    import torch

    from fedmoe.fl_client.bank import Bank, Opener
    from fedmoe.model.trainable import TrainableView

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggKeys:
    """The bank's identity, the consortium pins and the job's BFV secret context."""

    identity: Identity
    pins: ConsortiumPins
    bfv: BfvKey

    @classmethod
    def load(cls, config: BankConfig) -> SecAggKeys:
        key_dir = config.key_path.parent
        identity = load_identity(config.identity_path)  # the same key signs the bank's ledger
        if identity.bank_id != config.bank_id:
            raise ConfigError(f"bank {config.bank_id}: its identity file names {identity.bank_id!r}")
        pins = load_pins(key_dir / PINS_FILE)
        if pins.keys.get(config.bank_id) != identity.public_key:
            raise ConfigError(f"bank {config.bank_id}: its identity key is not the one pinned for it")
        return cls(identity, pins, load_bfv_secret(key_dir / BFV_SECRET_FILE))


# ---- the round's secrets between stages (on disk) ----------------------------------------
def state_file(job: JobConfig, config: BankConfig, round_idx: int) -> Path:
    return config.job_dir(job.job_id) / "secagg" / f"round-{round_idx:04d}.json"


def load_round(job: JobConfig, config: BankConfig, keys: SecAggKeys, round_idx: int) -> BankSecAgg:
    path = state_file(job, config, round_idx)
    if not path.exists():
        raise CryptoError(
            f"bank {config.bank_id}: no secure-aggregation state for round {round_idx}", reason="inconsistent"
        )
    return BankSecAgg.from_state(read_json(path), keys.identity, keys.pins)


def save_round(job: JobConfig, config: BankConfig, secagg: BankSecAgg) -> None:
    assert secagg.setup is not None
    atomic_write_json(state_file(job, config, secagg.setup.round), secagg.state_dict(), mode=0o600)


def forget_rounds(job: JobConfig, config: BankConfig, *, through: int) -> None:
    """Deletes the secrets and kept replies of rounds up to `through` (done, or superseded by a later round)."""
    folder = config.job_dir(job.job_id) / "secagg"
    for path in [*folder.glob("round-*.json"), *folder.glob("replies-*.json")]:
        if int(path.stem.split("-")[1]) <= through:
            path.unlink(missing_ok=True)


# ---- a restarted server repeats a round: the same request gets the same reply -----------------------
# A server that crashed mid-round (after banks trained and released, even after they unmasked) runs
# the round again. With the same setup it sends the same requests; each bank answers each one with
# the reply it already gave (kept until the round is superseded), so the round completes and no ε is
# lost. Nothing new leaves the bank: a different request at a stage already answered is refused by
# the release rules (BankSecAgg's stage checks), as before.
def replies_file(job: JobConfig, config: BankConfig, round_idx: int) -> Path:
    return config.job_dir(job.job_id) / "secagg" / f"replies-{round_idx:04d}.json"


def _request_key(stage: str, request: bytes) -> str:
    return f"{stage}:{hashlib.sha256(request).hexdigest()}"


def kept_reply(job: JobConfig, config: BankConfig, round_idx: int, stage: str, request: bytes) -> bytes | None:
    path = replies_file(job, config, round_idx)
    kept = read_json(path).get(_request_key(stage, request)) if path.exists() else None
    if kept is not None:
        logger.warning("bank %s: round %d %s repeated (a restarted server): the same reply", config.bank_id,
                       round_idx, stage)  # fmt: skip
    return bytes.fromhex(kept) if kept is not None else None


def keep_reply(job: JobConfig, config: BankConfig, round_idx: int, stage: str, request: bytes, reply: bytes) -> None:
    path = replies_file(job, config, round_idx)
    kept = read_json(path) if path.exists() else {}
    kept[_request_key(stage, request)] = reply.hex()
    atomic_write_json(path, kept, mode=0o600)


def binding_of(secagg: BankSecAgg) -> str:
    """What a masked input is bound to: this bank's signed advertisement (its fresh round keys)."""
    assert secagg.advertisement is not None
    return hashlib.sha256(secagg.advertisement.to_bytes()).hexdigest()


# ---- opening an aggregate -------------------------------------------------------------------------
def secagg_opener(job: JobConfig, config: BankConfig, keys: SecAggKeys) -> Opener:
    """Opens a stored secure aggregate: the setup must match this bank's key, view and job; the
    contributors' receipts must verify under the pins; the weight must equal their number."""

    def open_secagg(round_idx: int, blob: bytes, view: TrainableView) -> tuple[np.ndarray, float]:
        try:
            setup_bytes, aggregate_bytes = unpack_secagg_result(blob)
        except ConfigError as err:
            raise CryptoError(str(err), reason="malformed") from None
        setup, aggregate = RoundSetup.from_bytes(setup_bytes), SecureAggregate.from_bytes(aggregate_bytes)
        got = (setup.job_id, setup.round, setup.bfv_key_id, setup.params, setup.n_elements, setup.layout_hash)
        want = (job.job_id, round_idx, keys.bfv.key_id, keys.bfv.params, view.numel, view.layout_hash)
        if got != want:
            raise CryptoError(
                f"setup of the aggregate of round {round_idx} does not match this bank's job, key or model",
                reason="inconsistent",
            )
        floor = config.policy.min_banks  # the bank's own floor (open_aggregate also applies the setup's)
        mean, total = open_aggregate(aggregate, setup=setup, key=keys.bfv, pins=keys.pins, min_banks=floor)
        if round(total) != len(aggregate.contributors):
            raise CryptoError(
                f"total weight {total:.6g} for {len(aggregate.contributors)} signed contributors (each masks weight 1)",
                reason="inconsistent",
            )
        return mean, total

    return open_secagg


class SecAggSealer:
    """The masked-input stage's release: the delta masked (weight 1) and BFV-encrypted."""

    def __init__(
        self, job: JobConfig, config: BankConfig, keys: SecAggKeys, secagg: BankSecAgg, request: MaskedInputRequest
    ) -> None:
        self.job, self.config, self.keys, self.secagg, self.request = job, config, keys, secagg, request
        self.binding = binding_of(secagg)

    def check(self, bank: Bank) -> None:
        """What masked_input would refuse, checked before training so no budget is spent on it."""
        setup, request = self.secagg.setup, self.request
        assert setup is not None
        if self.secagg.stage != "shared":
            raise CryptoError(
                f"masked input: this bank's round is at stage {self.secagg.stage!r}", reason="inconsistent"
            )
        if (setup.n_elements, setup.layout_hash) != (bank.view.numel, bank.view.layout_hash):
            raise CryptoError(
                f"masked input: the setup's layout ({setup.n_elements} values) is not this bank's model "
                f"({bank.view.numel})",
                reason="layout",
            )
        if self.config.bank_id not in request.senders or len(request.senders) < self.secagg.floor():
            raise CryptoError(
                f"masked input: {len(request.senders)} share senders, need {self.secagg.floor()}", reason="too_few"
            )

    def seal(self, bank: Bank, round_idx: int, delta: torch.Tensor) -> bytes:
        masked = self.secagg.masked_input(self.request, delta.numpy().astype(np.float32), 1.0, self.keys.bfv)
        save_round(self.job, self.config, self.secagg)  # stage "masked" before the release is kept
        return masked.to_bytes()


# ---- the stages -----------------------------------------------------------------------------------
def handle_stage(job: JobConfig, config: BankConfig, request: RoundRequest, node_id: int) -> TrainReply:
    """One secure-aggregation exchange, under the bank's round lock."""
    request.check_job(job.job_id, config.bank_id)
    with exclusive_lock(config.lock_file):
        keys = SecAggKeys.load(config)
        if request.key_id != keys.bfv.key_id:
            raise ConfigError(
                f"bank {config.bank_id}: the server uses BFV key {request.key_id[:12]}, "
                f"this bank holds {keys.bfv.key_id[:12]}"
            )
        if request.stage is SecAggStage.IDENTIFY:
            statement = identify_statement(
                job_id=job.job_id, round=request.round, bank_id=config.bank_id, node_id=node_id
            )
            reply = _reply(config, request, keys.identity.sign(statement))
            if request.secagg_next:  # the server's guess at this round's setup: advertise with the binding
                reply = replace(reply, next_bundle=advertise_ahead(job, config, keys, request, request.round))
            return reply
        if request.stage is SecAggStage.ADVERTISE:
            return advertise(job, config, keys, request)
        if request.stage is SecAggStage.MASKED_INPUT:
            from fedmoe.fl_client.bank import train_once  # torch, the model and DP: only this stage trains

            secagg = load_round(job, config, keys, request.round)
            masked_request = MaskedInputRequest.from_bytes(request.secagg)
            if secagg.stage == "shared":  # (a repeat of a released round is answered by train_once)
                # every share opened and every pairwise agreement derived before any budget is spent:
                # a bad peer becomes a complaint naming it; a request this bank refuses raises here
                secagg.check_masked_input(masked_request, keys.bfv)
            sealer = SecAggSealer(job, config, keys, secagg, masked_request)
            reply = train_once(job, config, request, secagg_opener(job, config, keys), sealer)
            forget_reveals(job, config, through=applied_round(job, config))  # applied: never revealed
            if request.secagg_next and reply.status is TrainStatus.OK:  # the next round's setup
                reply = replace(reply, next_bundle=advertise_ahead(job, config, keys, request, request.round + 1))
            return reply
        return later_stage(job, config, keys, request)


def advertise(
    job: JobConfig, config: BankConfig, keys: SecAggKeys, request: RoundRequest, forget_through: int | None = None
) -> TrainReply:
    """Stage 0: fresh round keys, signed (a repeat of the same setup gets the same advertisement).
    Older rounds' secrets are deleted, through `forget_through` (default: the round before)."""
    setup = RoundSetup.from_bytes(request.secagg)
    if (setup.job_id, setup.round) != (job.job_id, request.round):
        raise CryptoError(f"advertise: setup for job {setup.job_id!r} round {setup.round}", reason="replay")
    refuse_accused(job, config, setup)
    forget_rounds(job, config, through=request.round - 1 if forget_through is None else forget_through)
    path = state_file(job, config, request.round)
    released = config.job_dir(job.job_id) / "released" / f"round-{request.round:04d}.json"
    if path.exists():
        old = BankSecAgg.from_state(read_json(path), keys.identity, keys.pins)
        # The same setup again gets the same keys while they are not shared yet (a repeat), or once the
        # round was released under them (a restarted server repeats the round: every later request it
        # repeats gets the reply already given). Keys shared but not yet used are never shared twice:
        # a bank in between takes fresh keys below.
        if old.setup == setup and old.advertisement is not None and (old.stage == "advertised" or released.exists()):
            return _reply(config, request, old.advertisement.to_bytes())
    if released.exists():  # a restarted round: its masked input went out under other keys
        reason = f"round {request.round} was already released under other round keys: not trained or masked again"
        return TrainReply(config.bank_id, request.round, TrainStatus.ALREADY_RELEASED, 0, "", reason=reason)
    policy = config.policy
    secagg = BankSecAgg(keys.identity, keys.pins, min_banks=policy.min_banks, colluding=policy.colluding_banks)
    advertisement = secagg.advertise(setup, keys.bfv)  # the setup's BFV key and parameters must be this bank's
    save_round(job, config, secagg)
    return _reply(config, request, advertisement.to_bytes())


def later_stage(job: JobConfig, config: BankConfig, keys: SecAggKeys, request: RoundRequest) -> TrainReply:
    """Stages 1, 3 and 4: share keys, consent to the unmask view, unmask (then forget the round)."""
    if request.stage is SecAggStage.REVEAL:  # accountability (docs/secagg.md "Accountable rounds")
        return _reply(config, request, reveal_stage(job, config, keys, request.secagg))
    if request.stage is SecAggStage.ACCUSE:
        return _reply(config, request, accuse_stage(job, config, keys, request.secagg))
    from fedmoe.fl_client.preflight import preflight  # torch and the bank's data: only these stages

    payload = kept_reply(job, config, request.round, str(request.stage), request.secagg)
    if payload is None:
        payload = answer_stage(job, config, keys, request)
    reply = _reply(config, request, payload)
    if request.stage is SecAggStage.SHARE_KEYS:  # keys for this round: and whether it would train in it
        reply = replace(reply, preflight=preflight(job, config, request.round))
    if request.stage is SecAggStage.UNMASK and request.secagg_next:  # the next round's share-keys request
        shares = share_ahead(job, config, keys, request)
        ready = preflight(job, config, request.round + 1) if shares else ""
        reply = replace(reply, next_bundle=shares, preflight=ready)
    return reply


def answer_stage(job: JobConfig, config: BankConfig, keys: SecAggKeys, request: RoundRequest) -> bytes:
    """Share keys, consent or unmask for the first time; the reply is kept for a repeat of the request.
    The round's secrets stay until a later round supersedes it (a restarted server may repeat it)."""
    secagg = load_round(job, config, keys, request.round)
    if request.stage is SecAggStage.SHARE_KEYS:
        out = secagg.share_keys(ShareKeysRequest.from_bytes(request.secagg))
    elif request.stage is SecAggStage.CONSENT:
        out = secagg.consent(UnmaskRequest.from_bytes(request.secagg))
    elif request.stage is SecAggStage.UNMASK:
        out = secagg.unmask(UnmaskOrder.from_bytes(request.secagg))
    else:
        raise ConfigError(f"bank {config.bank_id}: no handler for secagg stage {request.stage!r}")
    save_round(job, config, secagg)
    payload = out.to_bytes()
    keep_reply(job, config, request.round, str(request.stage), request.secagg, payload)
    if request.stage is SecAggStage.UNMASK and config.policy.reveal_on_quarantine:
        keep_for_reveal(job, config, secagg)
    return payload


# ---- accountability: a round's mask key kept until the round is applied, revealed on request --------
def reveal_file(job: JobConfig, config: BankConfig, round_idx: int) -> Path:
    return config.job_dir(job.job_id) / "secagg" / f"reveal-{round_idx:04d}.json"


def keep_for_reveal(job: JobConfig, config: BankConfig, secagg: BankSecAgg) -> None:
    """After unmasking, only under the policy's `reveal-on-quarantine`: what `reveal_stage` needs of
    the round (its setup, advertisement and mask secret key; no share held for a peer, no self-mask
    seed, no share key), 0600, until the bank applied that round (`forget_reveals`)."""
    kept = secagg.state_dict()
    kept.update(held={}, self_seed="", share_sk="")
    assert secagg.setup is not None
    atomic_write_json(reveal_file(job, config, secagg.setup.round), kept, mode=0o600)


def forget_reveals(job: JobConfig, config: BankConfig, *, through: int) -> None:
    for path in (config.job_dir(job.job_id) / "secagg").glob("reveal-*.json"):
        if int(path.stem.split("-")[1]) <= through:
            path.unlink(missing_ok=True)


def applied_round(job: JobConfig, config: BankConfig) -> int:
    state = config.job_dir(job.job_id) / "state.json"
    return int(read_json(state).get("applied_round", 0)) if state.exists() else 0


def reveal_stage(job: JobConfig, config: BankConfig, keys: SecAggKeys, evidence_bytes: bytes) -> bytes:
    """A quarantined round's evidence in, this bank's RoundReveal out, or a refusal naming the rule:
    the policy's `reveal-on-quarantine` and `max-reveals`, no round it applied, and the quarantine
    confirmed from the signed evidence with its own BFV key and its own aggregate check
    (BankSecAgg.reveal). Each reveal is logged in the job's `secagg/reveals.jsonl`."""
    from fedmoe.fl_client.aggregate_check import AggregateRejected, check_aggregate

    policy = config.policy
    evidence = QuarantineEvidence.from_bytes(evidence_bytes)
    round_idx = evidence.setup.round
    if not policy.reveal_on_quarantine:
        raise CryptoError(
            f"bank {config.bank_id}: its policy never reveals round keys ('reveal-on-quarantine' is false)"
        )
    path = reveal_file(job, config, round_idx)
    if not path.exists():
        raise CryptoError(f"bank {config.bank_id}: no round keys kept for round {round_idx}", reason="inconsistent")
    log = config.job_dir(job.job_id) / "secagg" / "reveals.jsonl"
    done = log.read_text(encoding="utf-8").splitlines() if log.exists() else []

    def rejects(mean: np.ndarray) -> str | None:
        try:
            check_aggregate(job, round_idx, mean, float(len(evidence.aggregate.contributors)))
        except AggregateRejected as err:
            return str(err)
        return None

    secagg = BankSecAgg.from_state(read_json(path), keys.identity, keys.pins)
    reveal = secagg.reveal(
        evidence,
        keys.bfv,
        rejects,
        applied_round=applied_round(job, config),
        reveals_left=policy.max_reveals - len(done),
    )
    with log.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"round": round_idx, "evidence_sha256": reveal.evidence_sha256.hex()}) + "\n")
    return reveal.to_bytes()


def accused_file(job: JobConfig, config: BankConfig) -> Path:
    return config.job_dir(job.job_id) / "secagg" / "accused.json"


def accuse_stage(job: JobConfig, config: BankConfig, keys: SecAggKeys, request_bytes: bytes) -> bytes:
    """A quarantined round's evidence and the reveals in, this bank's signed Verdict out: every
    contribution it can open with its own BFV key, checked against the bound an honest bank's own
    update obeys. A bank it finds out of bound is recorded in `secagg/accused.json`, and this bank
    never masks with it again in this job (`refuse_accused`)."""
    from fedmoe.fl_client.aggregate_check import check_contribution

    request = AccuseRequest.from_bytes(request_bytes)
    found = verdict(keys.identity, request, keys.bfv, keys.pins, lambda update: check_contribution(job, update))
    path = accused_file(job, config)
    accused = read_json(path) if path.exists() else {}
    for accusation in found.accused:
        accused.setdefault(accusation.bank_id, {"round": accusation.round, "reason": accusation.reason})
        logger.error("bank %s: %s poisoned round %d: %s", config.bank_id, accusation.bank_id, accusation.round,
                     accusation.reason)  # fmt: skip
    atomic_write_json(path, accused)
    return found.to_bytes()


def refuse_accused(job: JobConfig, config: BankConfig, setup: RoundSetup) -> None:
    """A setup with a bank this bank found poisoning an earlier round of the job is refused."""
    path = accused_file(job, config)
    accused = read_json(path) if path.exists() else {}
    for bank in setup.participants:
        if bank in accused:
            raise CryptoError(
                f"bank {config.bank_id}: the setup of round {setup.round} includes {bank!r}, which this bank "
                f"found poisoning round {accused[bank]['round']} ({accused[bank]['reason']}): refused",
                reason="inconsistent",
            )


def advertise_ahead(
    job: JobConfig, config: BankConfig, keys: SecAggKeys, request: RoundRequest, round_idx: int
) -> bytes:
    """An advertisement for the setup that came with another stage's request (round r+1's with
    round r's masked-input request; round r's with its identify request): the same checks and keys
    as the advertise stage (so a later advertise of that setup gets the same answer), keeping the
    carrying round's secrets. Never fails the carrying stage: on any refusal the bank sends none,
    and the server runs the advertise stage, where the bank's refusal reaches it as usual."""
    ahead = replace(request, round=round_idx, stage=SecAggStage.ADVERTISE, secagg=request.secagg_next)
    try:
        reply = advertise(job, config, keys, ahead, forget_through=request.round - 1)
    except Exception as err:  # noqa: BLE001 - the carrying stage's reply (a masked input, a binding) must go out
        logger.warning("bank %s: no advertisement ahead for round %d: %r", config.bank_id, ahead.round, err)
        return b""
    return reply.bundle if reply.status is TrainStatus.OK else b""


def share_ahead(job: JobConfig, config: BankConfig, keys: SecAggKeys, request: RoundRequest) -> bytes:
    """Round r+1's ShareKeysReply for the share-keys request that came with round r's unmask order,
    for the keys this bank advertised with its masked input; b"" on any refusal (the unmask reply
    still goes out, and the server runs round r+1's advertise stage: a bank whose keys were shared
    takes fresh ones there)."""
    next_round = request.round + 1
    stage = str(SecAggStage.SHARE_KEYS)
    kept = kept_reply(job, config, next_round, stage, request.secagg_next)
    if kept is not None:
        return kept
    try:
        share_request = ShareKeysRequest.from_bytes(request.secagg_next)
        if (share_request.setup.job_id, share_request.setup.round) != (job.job_id, next_round):
            raise CryptoError(f"share-keys request for round {share_request.setup.round}", reason="replay")
        secagg = load_round(job, config, keys, next_round)
        out = secagg.share_keys(share_request)
        save_round(job, config, secagg)
    except Exception as err:  # noqa: BLE001 - the unmask reply must go out
        logger.warning("bank %s: no key shares ahead for round %d: %r", config.bank_id, next_round, err)
        return b""
    payload = out.to_bytes()
    keep_reply(job, config, next_round, stage, request.secagg_next, payload)  # a repeat of it asks the same
    return payload


def _reply(config: BankConfig, request: RoundRequest, payload: bytes) -> TrainReply:
    return TrainReply(config.bank_id, request.round, TrainStatus.OK, 0, "", bundle=payload)


def handle_secagg_evaluate(job: JobConfig, config: BankConfig, request: RoundRequest) -> EvalReply:
    """An evaluate message under secure aggregation: open the pending aggregates with the BFV key."""
    from fedmoe.fl_client.bank import handle_evaluate

    request.check_job(job.job_id, config.bank_id)
    keys = SecAggKeys.load(config)
    reply = handle_evaluate(job, config, request, opener=secagg_opener(job, config, keys))
    with exclusive_lock(config.lock_file):  # the job's closing message: keys advertised ahead go
        forget_rounds(job, config, through=request.round + 1)
        forget_reveals(job, config, through=request.round + 1)
    return reply
