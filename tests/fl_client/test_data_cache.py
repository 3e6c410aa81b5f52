"""A bank packs its data once per (data, tokenizer, packing): the synthetic generator and the
tokenizer do not run again in the next message, a changed setting or file is a new entry, a
damaged entry is rebuilt, and the entry is as private as the data (0600)."""

from __future__ import annotations

import stat

import torch

import fedmoe.fl_client.task as task
from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.data import cache
from fedmoe.protocol.config import JobConfig


def job_and_bank(tmp_path, **overrides) -> tuple[JobConfig, BankConfig]:
    job = JobConfig(
        **(dict(job_id="cache", records_per_bank=120, seq_len=32, bank_state_root=str(tmp_path)) | overrides)
    )
    return job, BankConfig.from_node_config({"bank-id": "bank-0", "partition-id": 1}, job)


def counting_generator(monkeypatch) -> list[int]:
    calls: list[int] = []
    generate = task.generate_bank_corpus

    def counted(*args, **kwargs):
        calls.append(1)
        return generate(*args, **kwargs)

    monkeypatch.setattr(task, "generate_bank_corpus", counted)
    return calls


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "targets", "lengths")) and (
        a.unit_ids == b.unit_ids and a.record_indices == b.record_indices
    )


def test_packed_once_then_read_from_the_state_dir(tmp_path, monkeypatch):
    calls = counting_generator(monkeypatch)
    job, bank = job_and_bank(tmp_path)
    first = task.load_bank_data(job, bank, 1000)
    cache._MEMORY.clear()  # a new executor process: only the file is left
    second = task.load_bank_data(job, bank, 1000)
    assert len(calls) == 1
    assert same(first.train, second.train) and same(first.held_out, second.held_out)
    assert (first.source, first.fingerprint) == (second.source, second.fingerprint)
    (entry,) = (tmp_path / "bank-0" / "data-cache").glob("*.pt")
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600

    # another sequence length is another entry; the same settings again are served from memory
    task.load_bank_data(*job_and_bank(tmp_path, seq_len=48), 1000)
    task.load_bank_data(job, bank, 1000)
    assert len(calls) == 2 and len(list(entry.parent.glob("*.pt"))) == 2

    # a damaged entry is rebuilt, never trusted
    cache._MEMORY.clear()
    entry.write_bytes(b"not a torch file")
    rebuilt = task.load_bank_data(job, bank, 1000)
    assert len(calls) == 3 and same(rebuilt.train, first.train)


def test_a_changed_data_file_is_packed_again(tmp_path):
    data = tmp_path / "bank.csv"
    data.write_text("text\n" + "".join(f"Card payment of {i}.50 EUR at Bakery {i}\n" for i in range(40)))
    job = JobConfig(job_id="cache", seq_len=32, bank_state_root=str(tmp_path))
    bank = BankConfig.from_node_config({"bank-id": "bank-0", "data-path": str(data)}, job)
    first = task.load_bank_data(job, bank, 1000)
    data.write_text("text\n" + "".join(f"Transfer to account {i}\n" for i in range(40)))
    second = task.load_bank_data(job, bank, 1000)
    assert first.fingerprint != second.fingerprint and not same(first.train, second.train)
