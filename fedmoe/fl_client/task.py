"""A bank's task code: the job's model, the bank's data, its DP settings, its round seed.

One module used by the ClientApp (fedmoe.fl_client.bank), the local CLI and the canary audit, so all of
them build the same model from the same job and read the same data the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.data import (
    PackedData,
    generate_bank_corpus,
    load_text_file,
    make_bank_profiles,
    pack_records,
    train_eval_split,
)
from fedmoe.fl_client.data.cache import cache_key, cached
from fedmoe.fl_client.dp import DPConfig
from fedmoe.model.checkpoint import load_pretrained
from fedmoe.model.deepseek import DeepseekForCausalLM, preset
from fedmoe.model.lora import LoraConfig, configure_trainable
from fedmoe.model.tokenizer import load_tokenizer
from fedmoe.protocol.config import PRIVACY_UNITS, JobConfig
from fedmoe.protocol.errors import ConfigError


def checkpoint_fingerprint(folder: str | Path) -> str:
    """SHA-256 over a checkpoint folder's files (names and contents, sorted): what a job pins.

    A warm bank process checks the pin at every message. The digest is kept per file identity
    (path, size, mtime, ctime, inode of every file), so an unchanged folder is hashed once per
    process (a 540 MB base took ~1 s per message) and any write or replacement is hashed again.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"run config: 'base-checkpoint' expected a folder, got {str(folder)!r} (not found)")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    identity = tuple(
        (p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        for p, st in ((p, p.stat()) for p in files)
    )
    return _hash_files(str(folder.resolve()), identity)


@functools.lru_cache(maxsize=8)
def _hash_files(folder: str, identity: tuple[tuple[str, int, int, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, *_ in identity:
        digest.update(name.encode() + b"\0")
        with open(Path(folder, name), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def build_model(job: JobConfig) -> DeepseekForCausalLM:
    """The job's base model with its trainable view configured: identical at every bank.

    A base checkpoint is checked against the job's pin (`base-checkpoint-sha256`) first, so a
    bank never trains from a copy that differs from everyone else's. `base-precision = "int8"`
    keeps the frozen base in 8 bits (fedmoe.model.quant); the trainable view is the same.
    """
    if job.base_checkpoint:
        if job.base_checkpoint_sha256:
            found = checkpoint_fingerprint(job.base_checkpoint)
            if found != job.base_checkpoint_sha256:
                raise ConfigError(
                    f"base checkpoint {job.base_checkpoint!r}: content hash {found[:16]}..., the job pins "
                    f"'base-checkpoint-sha256' = {job.base_checkpoint_sha256[:16]}...; refusing to train from it"
                )
        model = load_pretrained(job.base_checkpoint)
    else:
        torch.manual_seed(job.seed)  # seeded init: every bank builds the same weights
        model = DeepseekForCausalLM(preset(job.model_preset))
    lora = LoraConfig(rank=job.lora_rank, alpha=job.lora_alpha, seed=job.seed)
    model = configure_trainable(model, job.train_mode, lora)
    if job.base_precision == "int8":  # after the adapters: their A factors come from the fp32 base
        from fedmoe.model.quant import quantize_frozen_  # (kept here: this edit touches build_model only)

        quantize_frozen_(model)
    return model


RECORD_HASH_BYTES = 16  # per-record digest kept on the bank (128 bits: collisions out of reach)


@dataclass
class BankData:
    train: PackedData  # one privacy unit (record or customer) per sample
    held_out: PackedData
    source: str
    fingerprint: str  # of the set of records (not their order, duplicates or the unit): the dataset's identity
    record_hashes: torch.Tensor  # uint8 (n_distinct, RECORD_HASH_BYTES), sorted: finds overlap with other ledgers
    has_customer_id: bool = False  # the bank's own data file has a customer_id column
    privacy_unit: str = "record"  # the unit the samples were packed for (the bank's, may be stronger than the job's)


def record_hashes(records: list[dict]) -> torch.Tensor:
    """The sorted set of per-record digests (SHA-256 of each record's canonical JSON, truncated),
    plus one digest per customer id (domain-separated): data about the same customers overlaps.

    Order- and duplicate-independent: the same records reordered, or with a row repeated, give the
    same set. It never leaves the bank (it is kept next to the bank's ledger to detect overlap).
    """
    items = {b"record\n" + json.dumps(r, sort_keys=True, default=str, ensure_ascii=False).encode() for r in records}
    items |= {b"customer\n" + str(r["customer_id"]).encode() for r in records if "customer_id" in r}
    digests = {hashlib.sha256(item).digest()[:RECORD_HASH_BYTES] for item in items}
    flat = b"".join(sorted(digests))
    return torch.frombuffer(bytearray(flat), dtype=torch.uint8).reshape(len(digests), RECORD_HASH_BYTES).clone()


def data_fingerprint(records: list[dict]) -> str:
    """SHA-256 over the sorted set of record digests: the dataset's identity, whatever the row order,
    duplicated rows or privacy unit (a customer-level round spends from the same lifetime budget)."""
    return hashlib.sha256(b"fedmoe.dataset/2\n" + record_hashes(records).numpy().tobytes()).hexdigest()


def load_bank_data(job: JobConfig, bank: BankConfig, vocab_size: int) -> BankData:
    """The bank's records -> packed train/eval samples (one record or customer per sample); built
    once per (data, tokenizer, packing) and cached in the bank's state dir (fedmoe/fl_client/data/cache.py)."""
    tokenizer = load_tokenizer(job.base_checkpoint or None)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids, model vocab_size is {vocab_size}")
    parts = {
        "tokenizer": [type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id],
        "split-pack": [job.seq_len, job.privacy_unit, bank.policy.privacy_unit, job.eval_fraction, job.seed],
        "identity": 3,  # record-set fingerprint + record and customer digests (issue 26)
        "data": "file" if bank.data_path is not None else
        ["synthetic", job.synthetic_banks, bank.partition_id, job.records_per_bank],
    }  # fmt: skip
    tokenizer_file = Path(job.base_checkpoint) / "tokenizer.json" if job.base_checkpoint else None
    key = cache_key(parts, data_file=bank.data_path, tokenizer_file=tokenizer_file)
    packed = cached(bank.state_root / "data-cache", key, lambda: _pack_bank_data(job, bank, tokenizer))
    return BankData(
        packed["train"], packed["held_out"], packed["source"], packed["fingerprint"], packed["record_hashes"],
        bool(packed["has_customer_id"]), str(packed["privacy_unit"]),
    )  # fmt: skip


def _pack_bank_data(job: JobConfig, bank: BankConfig, tokenizer) -> dict:
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
    # A bank's own file with a customer_id column: customer-level DP unless its policy says "record".
    # The synthetic corpus (generated, no real customers: tests and demos) keeps the job's unit.
    has_customer_id = bank.data_path is not None and bool(records) and "customer_id" in records[0]
    unit = stronger_unit(job.privacy_unit, bank.policy.unit_for(has_customer_id=has_customer_id))
    train, held_out = train_eval_split(records, eval_fraction=job.eval_fraction, seed=job.seed, privacy_unit=unit)
    pack = dict(
        encode=tokenizer.encode,
        seq_len=job.seq_len,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        privacy_unit=unit,
    )
    return {
        "train": pack_records(train, **pack),
        "held_out": pack_records(held_out, **pack),
        "source": source,
        "fingerprint": data_fingerprint(records),
        "record_hashes": record_hashes(records),
        "has_customer_id": int(has_customer_id),
        "privacy_unit": unit,
    }


def stronger_unit(a: str, b: str) -> str:
    """The stronger of two privacy units: a bank may always protect more than the job asks."""
    return max(a, b, key=PRIVACY_UNITS.index)


def dp_config(job: JobConfig, bank: BankConfig) -> DPConfig:
    """The DP settings of a round: the job's requests (checked against the bank's policy) + its shape."""
    return DPConfig(
        target_epsilon=job.epsilon,  # what the job asks; the policy check refused it if above the bank's
        delta=job.delta,
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


def round_seed(job: JobConfig, bank_id: str, round_idx: int) -> int:
    """Reproducible per-(job, bank, round) seed for simulations; secure_mode uses no seed at all."""
    digest = hashlib.sha256(f"{job.job_id}|{job.seed}|{bank_id}|{round_idx}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
