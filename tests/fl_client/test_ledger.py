"""The privacy ledger: entries from real private rounds, the hash chain, the mirror, budget helpers."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from test_dp_helpers import packed, tiny_model

from fedmoe.fl_client.dp import AccountantState, BudgetExceeded, DPConfig, train_private_round
from fedmoe.fl_client.dp.accountant import HistoryEntry, noise_multiplier_for, sample_rate_for
from fedmoe.fl_client.ledger import accountant_state_from_ledger, round_entry
from fedmoe.protocol.accounting import epsilon_pld, epsilon_rdp
from fedmoe.protocol.ledger import (
    BANK_SCHEMA,
    GENESIS_HASH,
    MIRROR_SCHEMA,
    Ledger,
    LedgerError,
    bank_exhausted,
    canonical_json,
    commitment_of,
    entry_hash,
    mirror_entry,
    mirror_path,
    skipped_rounds,
    verify_chain,
)

N, L = 48, 8
JOB = "job-1"


def planned_round(cfg: DPConfig, n_samples: int) -> HistoryEntry:
    """The history entry the bank's next round would add: (sigma, q, local_steps)."""
    return HistoryEntry(noise_multiplier_for(cfg, n_samples), sample_rate_for(cfg, n_samples), cfg.local_steps)


def config(**overrides) -> DPConfig:
    fields = dict(
        target_epsilon=1.0,
        delta=1e-5,
        clip_norm=1.0,
        planned_rounds=2,
        local_steps=2,
        expected_batch_size=6,
        physical_batch_size=4,  # = test_dp_budget: the calibration (lru-cached) is shared
        bank_id="bank-a",
        lr=1e-2,
    )
    fields.update(overrides)
    return DPConfig(**fields)


@pytest.fixture(scope="module")
def bank_ledger(tmp_path_factory):
    """A bank's ledger from real private rounds: trained, trained, then refused (budget 1.0)."""
    path = tmp_path_factory.mktemp("bank-a") / "ledger.jsonl"
    ledger = Ledger(path)
    cfg = config()
    model = tiny_model("lora", dtype=torch.float32)
    data = packed(N, L)
    state = AccountantState.fresh(cfg)
    reports = []
    for round_ in (1, 2, 3):
        try:
            report = train_private_round(model, data, cfg, state, seed=round_)
        except BudgetExceeded as err:
            entry = round_entry(
                job_id=JOB, bank_id="bank-a", round=round_, status="refused", report=None, cfg=cfg, n_samples=N,
                budget_epsilon=cfg.target_epsilon, state=state, planned=planned_round(cfg, N), reason=str(err),
            )  # fmt: skip
        else:
            entry = round_entry(
                job_id=JOB, bank_id="bank-a", round=round_, status="trained", report=report, cfg=cfg, n_samples=N,
                budget_epsilon=cfg.target_epsilon,
            )  # fmt: skip
            state = report.accountant_state
            reports.append(report)
        ledger.append(entry)
    return path, reports, state


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_lines(path, entries) -> None:
    path.write_text("".join(canonical_json(e) + "\n" for e in entries), encoding="utf-8")


def test_entries_from_real_rounds_record_the_mechanism_and_both_epsilons(bank_ledger):
    path, reports, state = bank_ledger
    entries = Ledger(path).entries()
    assert [e["status"] for e in entries] == ["trained", "trained", "refused"]
    assert [e["seq"] for e in entries] == [1, 2, 3] and entries[0]["prev_hash"] == GENESIS_HASH
    for entry, report in zip(entries[:2], reports, strict=True):
        assert entry["schema"] == BANK_SCHEMA
        assert (entry["noise_multiplier"], entry["sample_rate"], entry["local_steps"]) == (report.sigma, 6 / N, 2)
        assert entry["history"] == [list(h) for h in report.history]
        assert entry["epsilon"] == report.epsilon_total == entry["epsilon_prv"]
        # PRV is an upper bound within eps_error=0.01 of the truth: 1% + 0.01 apart at most
        assert abs(entry["epsilon_pld"] - report.epsilon_total) <= 0.01 * entry["epsilon_pld"] + 0.01
        assert entry["poisson_sampling"] is True and entry["privacy_unit"] == "record" and entry["n_samples"] == N
        assert set(entry["versions"]) >= {"torch", "opacus", "dp_accounting", "flwr", "tenseal"}
    # The refusal spent nothing, and says what the round would have cost.
    refused = entries[2]
    assert refused["history"] == entries[1]["history"] and refused["epsilon"] == entries[1]["epsilon"]
    assert refused["steps_run"] == 0 and "would bring epsilon" in refused["reason"]
    assert refused["epsilon_next_round"] == pytest.approx(entries[1]["epsilon_next_round"])
    assert refused["epsilon_next_round"] > 1.0
    # epsilon_next_round is one more identical round, what the server's selection reads.
    assert entries[0]["epsilon_next_round"] == pytest.approx(
        max(entries[1]["epsilon"], entries[1]["epsilon_replace_one"])
    )
    assert not bank_exhausted(entries[0]) and bank_exhausted(entries[1]) and bank_exhausted(refused)
    assert state.epsilon() == entries[1]["epsilon"]
    assert verify_chain(path).ok and verify_chain(path).n_entries == 3


def test_independent_accountants_agree_with_opacus_prv(bank_ledger):
    _, reports, _ = bank_ledger
    history = reports[-1].history
    pld, rdp = epsilon_pld(history, delta=1e-5), epsilon_rdp(history, delta=1e-5)
    assert abs(pld - reports[-1].epsilon_total) <= 0.01 * pld + 0.01  # PRV: upper bound within 0.01
    assert rdp > pld  # RDP is the looser bound
    assert epsilon_pld([], delta=1e-5) == 0.0 == epsilon_rdp([], delta=1e-5)


def test_editing_any_field_of_any_line_breaks_the_chain_at_that_line(bank_ledger, tmp_path):
    path, _, _ = bank_ledger
    original = lines(path)
    copy = tmp_path / "ledger.jsonl"
    edits = 0
    for index, entry in enumerate(original):
        for key, value in entry.items():
            tampered = [dict(e) for e in original]
            if isinstance(value, bool):
                new = not value
            elif isinstance(value, (int, float)):
                new = value + 1
            elif isinstance(value, str):
                new = value + "x"
            elif isinstance(value, list):
                new = value + [[9.0, 0.5, 1]]
            elif isinstance(value, dict):
                new = {**value, "torch": "0.0"}
            else:  # None
                new = 0.0
            tampered[index][key] = new
            write_lines(copy, tampered)
            report = verify_chain(copy)
            assert not report.ok and report.first_bad_line == index + 1, (key, report)
            assert report.n_entries == index
            edits += 1
    assert edits > 3 * 30


def test_deleting_or_moving_a_line_is_caught_at_the_next_line(bank_ledger, tmp_path):
    path, _, _ = bank_ledger
    original = lines(path)
    copy = tmp_path / "ledger.jsonl"
    for drop in (0, 1):
        write_lines(copy, [e for i, e in enumerate(original) if i != drop])
        report = verify_chain(copy)
        assert not report.ok and report.first_bad_line == drop + 1
        assert "'seq'" in report.problem and "deleted" in report.problem
    write_lines(copy, [original[1], original[0], original[2]])
    assert verify_chain(copy).first_bad_line == 1
    # Dropping the *last* line leaves a valid, shorter chain: the server's mirror catches that
    # (tests/fl_server/test_audit.py).
    write_lines(copy, original[:-1])
    assert verify_chain(copy).ok


def test_hand_reformatting_or_a_torn_last_line_is_reported(bank_ledger, tmp_path):
    path, _, _ = bank_ledger
    copy = tmp_path / "ledger.jsonl"
    text = path.read_text(encoding="utf-8").splitlines()
    copy.write_text("\n".join(text[:1] + [json.dumps(json.loads(text[1]), indent=1).replace("\n", " ")]) + "\n")
    report = verify_chain(copy)
    assert report.first_bad_line == 2 and "canonical" in report.problem
    copy.write_text(text[0] + "\n" + text[1][:40])
    report = verify_chain(copy)
    assert report.first_bad_line == 2 and "incomplete last line" in report.problem
    assert verify_chain(tmp_path / "missing.jsonl").problem == "file not found"


def test_append_refuses_a_broken_chain_and_writes_nothing(bank_ledger, tmp_path):
    path, _, _ = bank_ledger
    copy = tmp_path / "ledger.jsonl"
    entries = lines(path)
    entries[1]["epsilon"] = 0.1
    write_lines(copy, entries)
    before = copy.read_bytes()
    with pytest.raises(LedgerError, match=r"ledger\.jsonl:2: field 'hash'.*refusing"):
        Ledger(copy).append({"schema": BANK_SCHEMA, "round": 9})
    with pytest.raises(LedgerError, match=r"ledger\.jsonl:2"):
        Ledger(copy).entries()
    assert copy.read_bytes() == before


def test_append_adds_chain_fields_and_rejects_bad_entries(tmp_path):
    ledger = Ledger(tmp_path / "sub" / "ledger.jsonl")
    assert ledger.entries() == [] and ledger.last() is None
    first = ledger.append({"round": 1, "note": "é"})
    second = ledger.append({"round": 2, "written_at": "2026-01-01T00:00:00.000000Z"})
    assert (first["seq"], second["seq"]) == (1, 2) and second["prev_hash"] == first["hash"]
    assert first["hash"] == entry_hash(first) and "written_at" in first
    assert second["written_at"] == "2026-01-01T00:00:00.000000Z"
    assert ledger.last() == second and ledger.entries() == [first, second]
    with pytest.raises(LedgerError, match=r"must not carry \['hash'\]"):
        ledger.append({"round": 3, "hash": "00"})
    with pytest.raises(LedgerError, match="not canonical JSON"):
        ledger.append({"round": 3, "epsilon": float("nan")})
    assert len(ledger.entries()) == 2


def test_concurrent_appends_serialize(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")

    def worker(k: int) -> None:
        for i in range(8):
            Ledger(ledger.path).append({"worker": k, "i": i})

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = verify_chain(ledger.path)
    assert report.ok and report.n_entries == 24


def test_round_entry_refuses_inconsistent_arguments(bank_ledger):
    _, reports, state = bank_ledger
    cfg = config()
    common = dict(job_id=JOB, bank_id="bank-a", round=4, cfg=cfg, n_samples=N, budget_epsilon=1.0)
    statuses = r"\['trained', 'refused', 'skipped', 'dropped', 'failed', 'non-private'\]"
    with pytest.raises(LedgerError, match=f"status expected one of {statuses}"):
        round_entry(status="done", report=None, state=state, **common)
    with pytest.raises(LedgerError, match="status 'trained' expected a RoundPrivacyReport, got None"):
        round_entry(status="trained", report=None, **common)
    with pytest.raises(LedgerError, match="status 'skipped' expected no RoundPrivacyReport"):
        round_entry(status="skipped", report=reports[0], **common)
    with pytest.raises(LedgerError, match="needs the bank's unchanged accountant state"):
        round_entry(status="skipped", report=None, **common)
    with pytest.raises(LedgerError, match=r"report.n_samples expected 47, got 48"):
        round_entry(status="trained", report=reports[0], **{**common, "n_samples": 47})
    with pytest.raises(LedgerError, match=r"DPConfig.bank_id expected 'bank-b', got 'bank-a'"):
        round_entry(status="skipped", report=None, state=state, **{**common, "bank_id": "bank-b"})
    with pytest.raises(LedgerError, match="accountant state has accountant='prv', the DP config says 'rdp'"):
        round_entry(status="skipped", report=None, state=state, **{**common, "cfg": config(accountant="rdp")})
    skipped = round_entry(status="skipped", report=None, state=state, reason="not asked", **common)
    assert skipped["epsilon_next_round"] is None and skipped["noise_multiplier"] is None
    assert skipped["history"] == [list(h) for h in state.history] and skipped["steps_run"] == 0


def test_mirror_keeps_the_banks_commitment_and_never_its_numbers(bank_ledger, tmp_path):
    path, _, _ = bank_ledger
    raw_lines = path.read_text(encoding="utf-8").splitlines()
    bank_entry = json.loads(raw_lines[0])
    commitment = commitment_of(bank_entry, exhausted=False)
    mirror = Ledger(mirror_path(tmp_path / "ledger-mirror", "bank-a"))
    stored = mirror.append(
        mirror_entry(job_id=JOB, bank_id="bank-a", round=1, server_status="received", commitment=json.dumps(commitment))
    )
    assert stored["schema"] == MIRROR_SCHEMA and stored["commitment"] == commitment
    assert stored["commitment"]["hash"] == bank_entry["hash"]  # binds the bank to its full entry
    # n, q, sigma and epsilon stay at the bank: the dataset size cannot be read off the mirror
    assert not {"n_samples", "sample_rate", "noise_multiplier", "epsilon", "history"} & set(canonical_json(stored))
    mirror.append(mirror_entry(job_id=JOB, bank_id="bank-a", round=2, server_status="dropped", commitment=None,
                               reason="no reply within round-timeout"))  # fmt: skip
    assert verify_chain(mirror.path).ok
    assert mirror.path == tmp_path / "ledger-mirror" / "bank-a.jsonl"

    with pytest.raises(LedgerError, match=r"fields expected"):
        mirror_entry(job_id=JOB, bank_id="bank-a", round=1, server_status="received", commitment=bank_entry)
    with pytest.raises(LedgerError, match=r"field 'round' expected 2, got 1"):
        mirror_entry(job_id=JOB, bank_id="bank-a", round=2, server_status="received", commitment=commitment)
    with pytest.raises(LedgerError, match="'received' needs the bank's commitment"):
        mirror_entry(job_id=JOB, bank_id="bank-a", round=2, server_status="received", commitment=None)
    with pytest.raises(LedgerError, match="invalid JSON"):
        mirror_entry(job_id=JOB, bank_id="bank-a", round=1, server_status="received", commitment="{")
    with pytest.raises(LedgerError, match="64 hex digits"):
        mirror_entry(
            job_id=JOB, bank_id="bank-a", round=1, server_status="received", commitment={**commitment, "hash": "x"}
        )
    for bad in ("../bank", "a/b", ".hidden", ""):
        with pytest.raises(LedgerError, match="expected a bank id"):
            mirror_path(tmp_path, bad)


def entry(round_: int, *, nxt: float | None, budget: float = 1.0, status: str = "trained", eps: float = 0.5) -> dict:
    return {
        "schema": BANK_SCHEMA,
        "round": round_,
        "status": status,
        "epsilon": eps,
        "epsilon_next_round": nxt,
        "budget_epsilon": budget,
    }


def test_bank_exhausted_reads_next_round_epsilon_against_budget():
    assert not bank_exhausted(None)
    assert not bank_exhausted(entry(1, nxt=0.99))
    assert not bank_exhausted(entry(1, nxt=1.0))  # exactly at the budget still fits (check_budget: after > target)
    assert bank_exhausted(entry(1, nxt=1.0000001))
    assert bank_exhausted(entry(1, nxt=None, status="refused"))
    assert not bank_exhausted(entry(1, nxt=None))  # unknown: keep selecting; the bank itself refuses
    assert bank_exhausted(entry(1, nxt=float("nan")))


def test_skipped_rounds_between_the_last_entry_and_the_request():
    assert skipped_rounds([], 3) == []
    assert skipped_rounds([{"round": 1}, {"round": 2}], 3) == []
    assert skipped_rounds([{"round": 1}], 4) == [2, 3]


def test_the_ledger_implies_the_accountant_state(bank_ledger):
    path, _, state = bank_ledger
    entries = Ledger(path).entries()
    assert accountant_state_from_ledger(entries, config()) == state
    assert accountant_state_from_ledger(entries[:1], config()).history == state.history[:1]
    assert accountant_state_from_ledger([], config()) is None
    # a later job may read the same history at another accountant/delta: the history carries over
    rekeyed = accountant_state_from_ledger(entries, config(accountant="rdp", delta=1e-6))
    assert rekeyed.history == state.history and (rekeyed.mechanism, rekeyed.delta) == ("rdp", 1e-6)
