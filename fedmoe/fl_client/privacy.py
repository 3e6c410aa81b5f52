"""A bank's privacy bookkeeping for one train message: policy checks, DP config, ledger, accountant.

The budget belongs to the bank's *dataset identity*, not to a job, a file order or a privacy unit:
the ledger and the accountant live in `<state-root>/privacy/<dataset id>/`, so a new job on the
same data continues from the epsilon already spent, whatever unit it asks for (a customer-level
round is also a record-level one, and spends from the same record-level lifetime budget).

Which ledger: the policy's `dataset-id` when set; else the ledger that already holds any of these
records (or customers); else a new one named by the dataset fingerprint. Each ledger folder keeps
`records.sha256`, the sorted set of 16-byte digests of every record (and customer id) it ever
covered; it never leaves the bank. A dataset whose records overlap a *second* ledger is refused
(rule 'dataset-overlap'): its budget would be split. Adding rows needs nothing declared as long as
some old rows remain (the ledger is found by content); a bank that replaces its data wholesale
keeps its `dataset-id` in the policy. Everything here runs under the bank's round lock.

What leaves the bank about its privacy is a commitment to each ledger entry (ids, status, chain
position, hash, and the bank's own "exhausted" verdict) and, for a refusal, the rule's name and the
policy's limit: never n, q, 1/n, sigma or epsilon, from which the dataset size would follow.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fedmoe.crypto.identity import ConsortiumPins, generate_identity, load_identity, write_pins
from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.dp import AccountantState, DPConfig, DPError, HistoryEntry, train_private_round
from fedmoe.fl_client.dp.accountant import noise_multiplier_for, sample_rate_for
from fedmoe.fl_client.fedopt import local_dp_config
from fedmoe.fl_client.ledger import accountant_state_from_ledger, next_round_epsilon, round_entry
from fedmoe.fl_client.policy import Refusal, check_data, check_job, check_noise
from fedmoe.fl_client.task import RECORD_HASH_BYTES, BankData, dp_config, round_seed
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.errors import ConfigError
from fedmoe.protocol.files import atomic_write_bytes
from fedmoe.protocol.ledger import Ledger, Signer, bank_exhausted, commitment_of, skipped_rounds, utc_now

logger = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What a bank's local round produced: metrics and its ledger commitment, or why it refused."""

    metrics: dict[str, float] = field(default_factory=dict)
    commitment: str = ""  # JSON of the commitment to the stored ledger entry
    refused: str = ""  # the reason, when the bank's policy or budget said no


def bank_signer(config: BankConfig) -> Signer:
    """The bank's ledger signer from its identity key; a bank without one creates it on first use.

    A created key's public half is written next to it as a pins file (`identity.pins.json`): the
    consortium pins it, and the audit checks every entry's signature against the pinned key.
    """
    path = config.identity_path
    if path.exists():
        identity = load_identity(path)
    else:
        identity = generate_identity(path, config.bank_id)
        write_pins(path.with_name("identity.pins.json"), ConsortiumPins.from_identities([identity]))
        logger.warning("bank %s: created its identity key %s; pin its public key", config.bank_id, path.name)
    if identity.bank_id != config.bank_id:
        raise ConfigError(f"identity key {path.name}: belongs to {identity.bank_id!r}, this bank is {config.bank_id!r}")
    return identity.public_key.hex(), identity.sign


RECORDS_FILE = "records.sha256"  # in each ledger folder: the sorted digests of every record it covered


def _digests(path: Path) -> set[bytes]:
    raw = path.read_bytes() if path.exists() else b""
    width = RECORD_HASH_BYTES
    return {raw[i : i + width] for i in range(0, len(raw) - len(raw) % width, width)}


@dataclass(frozen=True)
class DatasetIdentity:
    """The ledger folder whose lifetime budget this data spends from, and any overlap problem."""

    folder: Path
    dataset_id: str
    overlapping: tuple[str, ...] = ()  # *other* ledgers that cover some of these records: refused


def dataset_identity(config: BankConfig, data: BankData) -> DatasetIdentity:
    """Finds this data's ledger: the policy's dataset-id, else the one holding any of its records."""
    root = config.state_root / "privacy"
    mine = {bytes(row) for row in data.record_hashes.numpy()}
    found = []
    for folder in sorted(p for p in root.glob("*") if p.is_dir()):
        if not mine.isdisjoint(_digests(folder / RECORDS_FILE)):
            found.append(folder)
    wanted = config.policy.dataset_id
    if wanted:
        target = root / wanted
    elif found:
        target = found[0]
    else:
        target = root / data.fingerprint[:24]
    others = tuple(f.name for f in found if f != target)
    return DatasetIdentity(target, target.name, others)


def record_coverage(identity: DatasetIdentity, data: BankData) -> None:
    """Adds this data's digests to its ledger's record set (before any entry is written)."""
    path = identity.folder / RECORDS_FILE
    known = _digests(path)
    mine = {bytes(row) for row in data.record_hashes.numpy()}
    if mine <= known:
        return
    union = sorted(known | mine)
    atomic_write_bytes(path, np.frombuffer(b"".join(union), dtype=np.uint8).tobytes())


def _load_accountant(path: Path, cfg: DPConfig) -> AccountantState:
    if not path.exists():
        return AccountantState.fresh(cfg)
    return AccountantState.from_json(path.read_text(encoding="utf-8"), source=str(path)).rekeyed(cfg)


class BankPrivacy:
    """The ledger (read once), the accountant and the DP config of one bank for one message."""

    def __init__(self, job: JobConfig, config: BankConfig, data: BankData) -> None:
        self.job, self.config, self.policy = job, config, config.policy
        # the unit the data was packed for: the job's, or stronger (customer when it has customer ids)
        self.cfg = replace(local_dp_config(job, dp_config(job, config)), privacy_unit=data.privacy_unit)
        self.customer_ids = data.has_customer_id
        self.n_samples, self.fingerprint = len(data.train), data.fingerprint
        self.identity = dataset_identity(config, data)
        self.dir = self.identity.folder
        record_coverage(self.identity, data)
        self.ledger = Ledger(self.dir / "ledger.jsonl")
        self.signer = bank_signer(config)
        self.entries = self.ledger.entries()
        accountant = _load_accountant(self.dir / "accountant.json", self.cfg)
        from_ledger = accountant_state_from_ledger(self.entries, self.cfg)
        # After a crash between ledger append and accountant save, the (longer) ledger wins.
        longer = from_ledger is not None and len(from_ledger.history) > len(accountant.history)
        self.accountant = from_ledger if longer else accountant

    @property
    def seeded(self) -> bool:
        return not self.cfg.secure_mode  # only reachable when the bank's policy allows seeded noise

    def within_policy(self) -> DPConfig:
        """The round's DP config with every request the policy does not allow replaced by the policy's
        value: what a refusal entry records as the bank's own (the request goes under `requested`), so
        a server that sends a job meant to be refused cannot write its numbers into the bank's record."""
        p = self.policy
        return replace(
            self.cfg,
            target_epsilon=min(self.cfg.target_epsilon, p.epsilon),
            delta=min(self.cfg.delta, p.max_delta),
            clip_norm=min(max(self.cfg.clip_norm, p.clip_norm_min), p.clip_norm_max),
            secure_mode=self.cfg.secure_mode or not p.seeded_noise,
        )

    def requested(self) -> dict:
        """What the job asked for, in run-config names (recorded beside the bank's values)."""
        job = self.job
        return {
            "dp": job.dp,
            "epsilon": job.epsilon,
            "delta": job.delta,
            "clip-norm": job.clip_norm,
            "secure-mode": job.secure_mode,
            "privacy-unit": job.privacy_unit,
            "aggregation": job.aggregation,
        }

    def append(self, round_idx: int, status: str, *, cfg: DPConfig | None = None, **details) -> dict:
        cfg = cfg or self.cfg
        noise = "none" if status == "non-private" else ("csprng" if cfg.secure_mode else "seeded")
        entry = round_entry(
            job_id=self.job.job_id,
            bank_id=self.config.bank_id,
            round=round_idx,
            status=status,
            cfg=cfg,
            n_samples=self.n_samples,
            budget_epsilon=cfg.target_epsilon,
            noise_source=noise,
            dataset_fingerprint=self.fingerprint,
            dataset_id=self.identity.dataset_id,
            customer_ids=self.customer_ids,
            policy_hash=self.policy.file_hash,
            policy_overrides=dict(self.policy.overrides),
            requested=self.requested(),
            released_metrics=self.policy.release_metrics,
            **({"report": None, "state": self.accountant.rekeyed(cfg)} | details),
        )
        return self.ledger.append(entry, signer=self.signer)

    def commit(self, stored: dict, *, exhausted: bool) -> str:
        return json.dumps(commitment_of(stored, exhausted=exhausted))

    def record_missed(self, upcoming_round: int, attempted: set[int]) -> None:
        """Rounds since the last entry: "failed" where the bank started and crashed, else "skipped"."""
        job_entries = [e for e in self.entries if e.get("job_id") == self.job.job_id]
        for missed in skipped_rounds(job_entries, upcoming_round):
            if missed in attempted:
                self.append(missed, "failed", reason="the bank's handler failed before it recorded this round")
            else:
                self.append(missed, "skipped", reason="the bank was not asked to train in this round")

    def refuse(self, round_idx: int, refusals: list[Refusal]) -> RoundResult:
        """Nothing trained, nothing spent; the refusal is on the bank's record and the server sees the rules.

        The server sees each refusal's rule and the policy's limit; the numbers behind it (n, q, sigma)
        go only to the bank's log and its own ledger entry.
        """
        public = "; ".join(map(str, refusals))
        detail = "; ".join(r.detail for r in refusals if r.detail)
        logger.warning("bank %s refuses round %d: %s%s", self.config.bank_id, round_idx, public,
                       f" ({detail})" if detail else "")  # fmt: skip
        reason = f"{public} [bank only: {detail}]" if detail else public
        bank_cfg = self.within_policy()
        stored = self.append(round_idx, "refused", cfg=bank_cfg, reason=reason, planned=self.planned(bank_cfg))
        return RoundResult(commitment=self.commit(stored, exhausted=True), refused=public)

    def planned(self, cfg: DPConfig) -> HistoryEntry | None:
        """The mechanism the next round would run under `cfg` (None when no noise can meet the budget)."""
        try:
            n = self.n_samples
            return HistoryEntry(noise_multiplier_for(cfg, n), sample_rate_for(cfg, n), cfg.local_steps)
        except DPError:
            return None

    def budget_refusal(self, detail: str) -> Refusal:
        return Refusal(
            "epsilon",
            self.job.epsilon,
            f"this round would pass the lifetime budget epsilon <= {self.policy.epsilon:g} of the bank's dataset "
            "(every job and privacy unit on it together)",
            rule="lifetime-budget",
            detail=detail,
        )

    def round_refusals(self) -> list[Refusal]:
        """The checks that need the bank's data; their text carries no number derived from it."""
        refusals = check_data(self.policy, n_samples=self.n_samples)
        try:
            q = sample_rate_for(self.cfg, self.n_samples)
        except DPError as err:
            bound = "cannot train within the budget: the expected batch must be smaller than this bank's dataset"
            return [*refusals, Refusal("batch-size", self.job.batch_size, bound, detail=str(err))]
        try:
            sigma = noise_multiplier_for(self.cfg, self.n_samples)
        except DPError as err:
            return [*refusals, self.budget_refusal(str(err))]
        refusals += check_noise(self.policy, self.job, noise_multiplier=sigma)
        # add/remove and replace-one: the noise level depends on n (fedmoe.fl_client.dp.accountant.check_budget)
        after = next_round_epsilon(self.accountant, HistoryEntry(sigma, q, self.cfg.local_steps))
        if after > min(self.cfg.target_epsilon, self.policy.epsilon):
            spent = self.accountant.epsilon()
            refusals.append(self.budget_refusal(f"epsilon {spent:.4f} spent, the round would bring it to {after:.4f}"))
        return refusals

    def policy_refusals(self) -> list[Refusal]:
        refusals = check_job(self.job, self.policy)
        if self.identity.overlapping:
            refusals.append(
                Refusal(
                    "dataset",
                    None,
                    "these records overlap more than one of the bank's dataset ledgers, so no single lifetime "
                    "budget covers them; the bank's operator must name the dataset ('dataset-id')",
                    rule="dataset-overlap",
                    of_policy=True,
                    detail=f"ledger {self.identity.dataset_id!r} and {list(self.identity.overlapping)}",
                )
            )
        if not refusals and self.job.dp:
            refusals += self.round_refusals()
        return refusals

    def train(self, model: torch.nn.Module, data: BankData, round_idx: int) -> RoundResult:
        """DP-SGD from the global view; the privacy spent is in the ledger before anything leaves."""
        seed = round_seed(self.job, self.config.bank_id, round_idx) if self.seeded else None
        if self.seeded:
            logger.warning(
                "bank %s round %d: SEEDED NOISE (bank policy 'seeded-noise'): anyone holding the update can "
                "reproduce it; for experiments only, the audit fails this ledger",
                self.config.bank_id,
                round_idx,
            )
        started_at = utc_now()
        try:
            report = train_private_round(model, data.train, self.cfg, self.accountant, seed=seed)
        except DPError as err:  # BudgetExceeded, or a budget too small for a single step: exhausted
            return self.refuse(round_idx, [self.budget_refusal(str(err))])
        # Ledger first, then accountant: a crash can over-count, never under-count. round_entry records
        # what one more identical round would bring epsilon to: the bank's own "exhausted" verdict.
        stored = self.append(round_idx, "trained", report=report, state=None, started_at=started_at)
        report.accountant_state.save(self.dir / "accountant.json")
        exhausted = bank_exhausted(stored)
        return RoundResult(
            metrics={"train-loss": report.mean_loss}, commitment=self.commit(stored, exhausted=exhausted)
        )

    def record_non_private(self, round_idx: int, metrics: dict[str, float]) -> RoundResult:
        """A round without DP (only where the bank's policy allows it): on the record, as such."""
        stored = self.append(round_idx, "non-private", reason="job dp=false, allowed by the bank's policy")
        return RoundResult(metrics=metrics, commitment=self.commit(stored, exhausted=False))
