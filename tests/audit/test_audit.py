"""The ledger audit: chains, independent epsilon, mirror cross-checks, the report and the CLI.

The job's ledgers are realistic: every history and epsilon comes from fedmoe.fl_client.dp's own
calibration and accountant (`noise_multiplier_for`, `check_budget`), exactly what
`train_private_round` reports, without the (irrelevant here) local steps.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from rich.console import Console

from fedmoe.audit import audit_ledgers, render_table, write_html_report
from fedmoe.audit.__main__ import main
from fedmoe.crypto.identity import ConsortiumPins, generate_identity, write_pins
from fedmoe.fl_client.dp import (
    AccountantState,
    BudgetExceeded,
    DPConfig,
    HistoryEntry,
    RoundPrivacyReport,
    check_budget,
)
from fedmoe.fl_client.dp.accountant import noise_multiplier_for, sample_rate_for
from fedmoe.fl_client.ledger import round_entry
from fedmoe.protocol.accounting import epsilon_pld, epsilon_rdp
from fedmoe.protocol.ledger import (
    CHAIN_FIELDS,
    Ledger,
    canonical_json,
    commitment_of,
    entry_hash,
    mirror_entry,
    mirror_path,
)

JOB, N = "job-7", 48
_KEYS = Path(tempfile.mkdtemp(prefix="identities-"))
IDENTITIES = {bank: generate_identity(_KEYS / f"{bank}.secret", bank) for bank in ("bank-a", "bank-b")}
PINS = ConsortiumPins.from_identities(list(IDENTITIES.values()))
PINS_FILE = write_pins(_KEYS / "pins.json", PINS)


def signer_for(bank: str):
    identity = IDENTITIES.get(bank)
    return (identity.public_key.hex(), identity.sign) if identity else None


def audit_pinned(files, **kwargs):
    """Against the pins of the banks whose ledgers or mirrors are given (a pinned bank must have a ledger)."""
    named = set()
    for path in map(Path, files):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []:
            try:
                named.add(json.loads(line).get("bank_id"))
            except (ValueError, AttributeError):
                continue
    in_scope = {bank: key for bank, key in PINS.keys.items() if bank in named}
    return audit_ledgers(files, pins=ConsortiumPins(in_scope), **kwargs)


def planned_round(cfg: DPConfig, n_samples: int) -> HistoryEntry:
    """The history entry the bank's next round would add: (sigma, q, local_steps)."""
    return HistoryEntry(noise_multiplier_for(cfg, n_samples), sample_rate_for(cfg, n_samples), cfg.local_steps)


def dp_config(bank: str, **overrides) -> DPConfig:
    fields = dict(
        target_epsilon=1.0,
        delta=1e-5,
        clip_norm=1.0,
        planned_rounds=2,
        local_steps=2,
        expected_batch_size=6,
        physical_batch_size=4,  # = test_dp_budget: the calibration (lru-cached) is shared
        bank_id=bank,
        lr=1e-2,
    )
    fields.update(overrides)
    return DPConfig(**fields)


def accountant_round(cfg: DPConfig, state: AccountantState, planned: HistoryEntry | None = None) -> RoundPrivacyReport:
    """What train_private_round reports for a round, from the same calibration and budget check."""
    planned = planned or planned_round(cfg, N)
    budget = check_budget(cfg, state, planned)  # raises BudgetExceeded like the trainer
    new_state = state.appended(planned)
    return RoundPrivacyReport(
        bank_id=cfg.bank_id,
        epsilon_spent_this_round=budget.epsilon_after - budget.epsilon_before,
        epsilon_total=budget.epsilon_after,
        epsilon_before=budget.epsilon_before,
        delta=cfg.delta,
        accountant=cfg.accountant,
        sigma=planned.noise_multiplier,
        q=planned.sample_rate,
        steps=planned.steps,
        history=new_state.history,
        accountant_state=new_state,
        target_epsilon=cfg.target_epsilon,
        n_samples=N,
        clip_norm=cfg.clip_norm,
        mean_loss=0.0,
        empty_batches=0,
        grad_sample_mode=cfg.grad_sample_mode,
    )


def run_bank(root: Path, cfg: DPConfig, plan: dict[int, str]) -> None:
    """Rounds of one bank: "train" (refused when over budget) or "skip"; ledger + server mirror."""
    ledger = Ledger(root / "banks" / cfg.bank_id / "ledger.jsonl")
    mirror = Ledger(mirror_path(root / "server" / "ledger-mirror", cfg.bank_id))
    state = AccountantState.fresh(cfg)
    common = dict(job_id=JOB, bank_id=cfg.bank_id, cfg=cfg, n_samples=N, budget_epsilon=cfg.target_epsilon)
    for round_, action in plan.items():
        if action == "skip":  # the server did not select the bank; the bank notes it later
            mirror.append(mirror_entry(job_id=JOB, bank_id=cfg.bank_id, round=round_, server_status="skipped",
                                       commitment=None, reason="not connected"))  # fmt: skip
            ledger.append(round_entry(round=round_, status="skipped", report=None, state=state, **common),
                          signer=signer_for(cfg.bank_id))  # fmt: skip
            continue
        try:
            report = accountant_round(cfg, state)
        except BudgetExceeded as err:
            entry = round_entry(round=round_, status="refused", report=None, state=state,
                                planned=planned_round(cfg, N), reason=str(err), **common)  # fmt: skip
        else:
            entry = round_entry(round=round_, status="trained", report=report, **common)
            state = report.accountant_state
        stored = ledger.append(entry, signer=signer_for(cfg.bank_id))
        commitment = commitment_of(stored, exhausted=entry["status"] == "refused")
        mirror.append(mirror_entry(job_id=JOB, bank_id=cfg.bank_id, round=round_, server_status="received",
                                   commitment=commitment))  # fmt: skip


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("job")
    run_bank(root, dp_config("bank-a"), {1: "train", 2: "train", 3: "train"})  # 3rd refused
    run_bank(root, dp_config("bank-b", accountant="rdp", target_epsilon=3.0), {1: "train", 2: "skip", 3: "train"})
    return root


def paths(root: Path) -> list[Path]:
    return [
        root / "banks" / "bank-a" / "ledger.jsonl",
        root / "banks" / "bank-b" / "ledger.jsonl",
        root / "server" / "ledger-mirror" / "bank-a.jsonl",
        root / "server" / "ledger-mirror" / "bank-b.jsonl",
    ]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(canonical_json(e) + "\n" for e in entries), encoding="utf-8")


def rechain(path: Path, entries: list[dict], *, sign: bool = True) -> None:
    """Writes `entries` as a *valid* chain (what someone rewriting the whole file would do).

    sign=True re-signs with the bank's own identity key (so a test isolates the check it is about);
    sign=False is what anyone without the bank's key can do.
    """
    path.unlink(missing_ok=True)
    ledger = Ledger(path)
    for entry in entries:
        body = {k: v for k, v in entry.items() if k not in (*CHAIN_FIELDS, "signer", "signature")}
        signer = signer_for(entry["bank_id"]) if sign and "bank_id" in entry else None
        ledger.append(body, signer=signer)


def errors_at(result, path: Path, line: int | None = None, check: str | None = None) -> list:
    return [
        f
        for f in result.errors
        if f.path == path and (line is None or f.line == line) and (check is None or f.check == check)
    ]


def tampered(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + [[9.0, 0.5, 1]]
    if isinstance(value, dict):
        return {**value, "edited": 1}
    return 0.5  # None


# ---------------------------------------------------------------------------------------------


def test_clean_job_passes_and_recomputed_epsilon_matches_within_1_percent(job):
    result = audit_pinned(paths(job))
    assert result.ok and not result.findings, [str(f) for f in result.findings]
    assert [f.kind for f in result.files] == ["bank", "bank", "mirror", "mirror"]
    a, b = result.banks
    assert (a.bank_id, a.rounds_trained, a.rounds_refused, a.rounds_skipped) == ("bank-a", (1, 2), (3,), ())
    assert (b.bank_id, b.rounds_trained, b.rounds_refused, b.rounds_skipped) == ("bank-b", (1, 3), (), (2,))
    assert a.authority.endswith("bank-a/ledger.jsonl") and a.ok and b.ok
    # bank-a accounts with PRV (an upper bound within 0.01), bank-b with RDP: both re-derived.
    assert abs(a.epsilon_recorded - a.epsilon_pld) <= 0.01 * a.epsilon_pld + 0.01
    assert abs(b.epsilon_recorded - b.epsilon_rdp) <= 0.01 * b.epsilon_rdp
    assert 0 <= a.remaining < 0.02 and a.budget == 1.0 and b.budget == 3.0
    for path in paths(job)[:2]:
        for entry in read(path):
            pld = epsilon_pld(entry["history"], delta=entry["delta"])
            assert abs(entry["epsilon_pld"] - pld) <= 0.01 * pld
            if entry["accountant"] == "rdp":
                rdp = epsilon_rdp(entry["history"], delta=entry["delta"])
                assert abs(entry["epsilon"] - rdp) <= 0.01 * rdp


def test_editing_any_field_of_any_line_fails_naming_that_file_and_line(job, tmp_path):
    originals = paths(job)
    n_edits = 0
    for index, path in enumerate(originals):
        entries = read(path)
        copy = tmp_path / path.parent.name / path.name
        others = [p for i, p in enumerate(originals) if i != index]
        for line, entry in enumerate(entries, start=1):
            fields = [(key, None) for key in entry]
            if isinstance(entry.get("bank_entry"), dict):  # and every field of the mirrored bank entry
                fields += [("bank_entry", key) for key in entry["bank_entry"]]
            for key, inner in fields:
                edited = [json.loads(json.dumps(e)) for e in entries]
                if inner is None:
                    edited[line - 1][key] = tampered(entry[key])
                else:
                    edited[line - 1][key][inner] = tampered(entry[key][inner])
                write(copy, edited)
                result = audit_pinned([copy, *others])
                assert not result.ok
                # the signature is over the hash, outside it: an edited signature is a bad signature
                check = "bad-signature" if key == "signature" else "chain"
                hits = errors_at(result, copy, line, check)
                assert hits, (path.name, line, key, inner, [str(f) for f in result.errors])
                n_edits += 1
    assert n_edits > 250


def test_deleting_a_line_is_caught_and_a_deleted_tail_is_caught_by_the_mirror(job, tmp_path):
    bank_a, bank_b, mirror_a, mirror_b = paths(job)
    copy = tmp_path / "ledger.jsonl"
    entries = read(bank_a)

    write(copy, [entries[0], entries[2]])  # middle line deleted
    result = audit_pinned([copy, mirror_a])
    [chain] = errors_at(result, copy, 2, "chain")
    assert "field 'seq': expected 2, got 3" in chain.message

    write(copy, entries[:2])  # last line deleted: a valid shorter chain ...
    assert audit_pinned([copy]).ok
    result = audit_pinned([copy, mirror_a])  # ... but the server mirrored it
    [cut] = errors_at(result, copy, 3, "cross-check")
    assert "ends after 2 entr(ies)" in cut.message and "mirrored entry seq 3 (round 3" in cut.message
    assert str(mirror_a) in cut.message

    mirror_entries = read(mirror_a)
    mirror_copy = tmp_path / "bank-a.jsonl"
    write(mirror_copy, [mirror_entries[0], mirror_entries[2]])
    assert errors_at(audit_pinned([bank_a, mirror_copy]), mirror_copy, 2, "chain")


def test_a_rewritten_ledger_with_valid_hashes_is_caught_by_the_mirror(job, tmp_path):
    bank_a, _, mirror_a, _ = paths(job)
    copy = tmp_path / "ledger.jsonl"
    entries = read(bank_a)
    entries[2]["reason"] = "a friendlier reason"
    entries[2]["hash"] = entry_hash(entries[2])  # last line re-hashed: the file's own chain is fine
    write(copy, entries)
    [unsigned] = errors_at(audit_pinned([copy]), copy, 3)  # its chain is fine; its signature is not
    assert unsigned.check == "bad-signature"
    result = audit_pinned([copy, mirror_a])
    [found] = errors_at(result, copy, 3, "cross-check")
    assert "the bank's ledger was rewritten" in found.message and f"{mirror_a}:3" in found.message


def test_recorded_epsilon_more_than_1_percent_off_fails_even_with_a_valid_chain(job, tmp_path):
    bank_a = paths(job)[0]
    copy = tmp_path / "ledger.jsonl"
    entries = read(bank_a)

    entries[1]["epsilon_pld"] *= 1.005  # within 1%
    rechain(copy, entries)
    assert audit_pinned([copy]).ok

    entries[1]["epsilon_pld"] *= 1.02 / 1.005
    entries[1]["epsilon"] *= 0.975  # 1.5% under the recomputed PLD (a PRV value may only sit above it)
    rechain(copy, entries)
    result = audit_pinned([copy])
    found = errors_at(result, copy, 2, "epsilon")
    messages = " | ".join(f.message for f in found)
    assert "field 'epsilon_pld': recorded" in messages and "recomputed" in messages and "PLD" in messages
    assert "field 'epsilon': recorded" in messages
    assert not result.ok and not [f for f in result.errors if f.line != 2 and f.check == "epsilon"]


def test_rdp_bank_epsilon_is_rechecked_with_dp_accountings_rdp(job, tmp_path):
    bank_b = paths(job)[1]
    copy = tmp_path / "ledger.jsonl"
    entries = read(bank_b)
    entries[0]["epsilon"] *= 1.02
    rechain(copy, entries)
    [found] = [f for f in audit_pinned([copy]).errors if f.check == "epsilon"]
    assert found.line == 1 and "by RDP (dp_accounting)" in found.message


def test_non_poisson_over_budget_and_unspent_history_entries_fail(job, tmp_path):
    bank_a = paths(job)[0]
    copy = tmp_path / "ledger.jsonl"
    entries = read(bank_a)
    entries[0]["poisson_sampling"] = False
    rechain(copy, entries)
    [found] = errors_at(audit_pinned([copy]), copy, 1, "poisson")
    assert "non-Poisson entry" in found.message

    entries = read(bank_a)
    for e in entries:
        e["budget_epsilon"] = 0.9
    rechain(copy, entries)
    [found] = errors_at(audit_pinned([copy]), copy, 2, "budget")
    # sigma was calibrated so that replace-one (the larger here) spends the budget of 1.0
    assert found.message.startswith("over budget under replace-one adjacency") and "0.999" in found.message

    entries = read(bank_a)
    entries[1]["history"] = entries[0]["history"]  # "trained" but the history did not grow
    rechain(copy, entries)
    found = errors_at(audit_pinned([copy]), copy, 2, "history")
    assert any("plus this round" in f.message for f in found)


def test_a_round_recorded_twice_is_a_warning_and_rounds_out_of_order_an_error(job, tmp_path):
    bank_a = paths(job)[0]
    copy = tmp_path / "ledger.jsonl"
    entries = read(bank_a)
    entries[2]["round"] = 2  # the refusal re-sent for round 2 (server restarted mid-round)
    rechain(copy, entries)
    result = audit_pinned([copy])
    assert result.ok and [(f.line, f.message) for f in result.warnings] == [(3, "round 2 recorded again (re-run?)")]
    entries[2]["round"] = 1
    rechain(copy, entries)
    [found] = errors_at(audit_pinned([copy]), copy, 3, "sequence")
    assert "expected >= 2 (rounds in order), got 1" in found.message


def test_malformed_content_is_reported_not_raised(job, tmp_path):
    entries = read(paths(job)[0])
    broken = [dict(entries[0], sample_rate=None), dict(entries[1], history="abc"), dict(entries[2], accountant="gdp")]
    copy = tmp_path / "ledger.jsonl"
    rechain(copy, broken)
    result = audit_pinned([copy])
    assert [(f.line, f.check) for f in result.errors] == [(1, "schema"), (2, "schema"), (3, "schema")]
    assert "expected all null or sigma > 0" in result.errors[0].message
    other = tmp_path / "other.jsonl"
    rechain(other, [{"schema": "something/else"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = audit_pinned([other, empty, tmp_path / "missing.jsonl"])
    assert [(f.path.name, f.line, f.check) for f in result.errors] == [
        ("other.jsonl", 1, "schema"),
        ("missing.jsonl", None, "chain"),
    ]
    assert [f.message for f in result.warnings] == ["empty ledger"] and not result.banks


def test_a_mirror_without_its_bank_ledger_fails_and_a_forged_commitment_is_caught(job, tmp_path):
    bank_a, bank_b, mirror_a, mirror_b = paths(job)
    # The mirror holds commitments only (no n, no epsilon): without the bank's ledger, the audit fails.
    result = audit_pinned([bank_a, mirror_a, mirror_b])
    assert not result.ok
    [missing] = [f for f in result.errors if f.check == "missing-ledger"]
    assert missing.path == mirror_b and "bank 'bank-b'" in missing.message

    copy = tmp_path / "bank-a.jsonl"
    lines = read(mirror_a)
    lines[1]["commitment"]["hash"] = "0" * 64  # a forged commitment, mirror line re-chained
    rechain(copy, lines)
    found = [f for f in audit_pinned([bank_a, copy]).errors if f.check in ("cross-check", "mirror")]
    assert found and any("hash" in f.message for f in found), [str(f) for f in found]


def test_table_and_html_report(job, tmp_path):
    result = audit_pinned(paths(job))
    console = Console(record=True, width=200)
    render_table(result, console)
    text = console.export_text()
    assert "bank-a" in text and "bank-b" in text and "remaining" in text and "AUDIT PASSED" in text
    report = write_html_report(result, tmp_path / "out")
    assert report == tmp_path / "out" / "report.html"
    html = report.read_text(encoding="utf-8")
    # the plots travel inside the page (an emailed report keeps them); no file next to it is needed
    assert "AUDIT PASSED" in html and 'src="data:image/png;base64,' in html and "bank-b" in html
    assert 'src="epsilon.png"' not in html


def test_cli_exit_codes_default_out_dir_and_named_failures(job, tmp_path, capsys):
    root = tmp_path / "job"
    shutil.copytree(job, root)
    files = paths(root)
    assert main([str(p) for p in files] + ["--pins", str(PINS_FILE)]) == 0
    assert (root / "banks" / "bank-a" / "audit" / "report.html").exists()  # next to the first ledger
    assert "data:image/png;base64," in (root / "banks" / "bank-a" / "audit" / "report.html").read_text()

    entries = read(files[1])
    entries[1]["epsilon"] = 0.01
    write(files[1], entries)
    out = tmp_path / "report"
    assert main([str(p) for p in files] + ["--out", str(out), "--pins", str(PINS_FILE)]) == 1
    printed = capsys.readouterr().out
    assert "AUDIT FAILED" in printed and f"{files[1]}:2" in printed
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "AUDIT FAILED" in html and f"{files[1]}:2" in html

    with pytest.raises(SystemExit) as usage:
        main([])
    assert usage.value.code == 2


def test_history_entry_round_trip_matches_the_accountant(job):
    """The recorded history is exactly what the bank's accountant composed."""
    entries = read(paths(job)[0])
    state = AccountantState.from_dict(
        {"version": 1, "mechanism": "prv", "delta": 1e-5, "history": entries[1]["history"]}
    )
    assert state.history[0] == HistoryEntry(*entries[0]["history"][0])
    assert state.epsilon() == entries[1]["epsilon"]


def test_a_rehashed_chain_without_the_banks_signature_fails_naming_the_line(job, tmp_path):
    bank_a = paths(job)[0]
    lines = read(bank_a)
    lines[1]["epsilon"] = 0.01  # the classic "truncate and re-hash" rewrite, by someone without the key
    copy = tmp_path / "bank-a.jsonl"
    rechain(copy, lines, sign=False)
    result = audit_pinned([copy])
    assert {f.line for f in result.errors if f.check == "missing-signature"} == {1, 2, 3}
    mallory = generate_identity(tmp_path / "mallory.secret", "bank-a")  # a key the consortium never pinned
    path = tmp_path / "bank-a-mallory.jsonl"
    path.unlink(missing_ok=True)
    ledger = Ledger(path)
    for entry in lines:
        body = {k: v for k, v in entry.items() if k not in (*CHAIN_FIELDS, "signer", "signature")}
        ledger.append(body, signer=(mallory.public_key.hex(), mallory.sign))
    bad = [f for f in audit_pinned([path]).errors if f.check == "bad-signature"]
    assert [f.line for f in bad] == [1, 2, 3] and all(f.path == path for f in bad)
    assert audit_pinned([bank_a]).ok  # the genuine, signed ledger passes
