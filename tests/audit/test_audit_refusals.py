"""The audit words a refusal as a refusal and a bank that never trained as one (issue 31).

On the old code an audit of a messy history failed with `missing-ledger` errors for banks that never
trained in the job (the server's mirror held only skipped or refused rows for them), showed a bank that
had refused and spent nothing as "-4.012 (overspent)" (its budget column was the job's ε, not its
policy's), and failed its refusal with `policy-budget` ("record the overspend") because the refusal
carries the ε earlier rounds spent, above a budget the bank had lowered since.
"""

from __future__ import annotations

import json

from rich.console import Console

from fedmoe.audit import audit_ledgers, render_table, write_report
from fedmoe.crypto.identity import ConsortiumPins, generate_identity
from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.dp import AccountantState
from fedmoe.fl_client.ledger import round_entry
from fedmoe.protocol.ledger import Ledger, commitment_of, mirror_entry, mirror_path
from fedmoe.protocol.messages import TrainStatus
from tests.audit.test_audit import IDENTITIES, JOB, N, dp_config, paths, planned_round, run_bank
from tests.fl_client.test_bank_policy import bank_config, keys, ledger_entries, make_job, train  # noqa: F401

OVERSPEND = ("overspent", "record the overspend")


def shown(result, out) -> str:
    """Everything an officer reads: the console, report.html and findings.json."""
    console = Console(record=True, width=400)
    render_table(result, console)
    files = write_report(result, out)
    return console.export_text() + files.html.read_text(encoding="utf-8") + files.findings.read_text(encoding="utf-8")


def mirror_only(root, bank: str, rows: list[tuple[str, dict | None]]):
    """The server's mirror of a bank whose ledger is not given: (server_status, commitment) per round."""
    mirror = Ledger(mirror_path(root / "server" / "ledger-mirror", bank))
    for round_, (status, commitment) in enumerate(rows, start=1):
        mirror.append(mirror_entry(job_id=JOB, bank_id=bank, round=round_, server_status=status,
                                   commitment=commitment, reason="refused: pre-flight"))  # fmt: skip
    return mirror.path


def refusal_commitment(root, identity) -> dict:
    """bank-d's own refusal of round 2 (signed, in its ledger, which the officer does not get)."""
    cfg = dp_config(identity.bank_id)
    entry = round_entry(job_id=JOB, bank_id=identity.bank_id, round=2, status="refused", report=None, cfg=cfg,
                        n_samples=N, budget_epsilon=1.0, state=AccountantState.fresh(cfg),
                        planned=planned_round(cfg, N), reason="refused by the bank's own policy")  # fmt: skip
    stored = Ledger(root / "bank-d-ledger.jsonl").append(entry, signer=(identity.public_key.hex(), identity.sign))
    return commitment_of(stored, exhausted=True)


def test_banks_that_never_trained_in_the_job_are_a_note_not_a_missing_ledger(tmp_path):
    run_bank(tmp_path, dp_config("bank-a"), {1: "train", 2: "train"})
    bank_c = generate_identity(tmp_path / "bank-c.secret", "bank-c")
    bank_d = generate_identity(tmp_path / "bank-d.secret", "bank-d")
    pins = ConsortiumPins.from_identities([IDENTITIES["bank-a"], bank_c, bank_d])
    never = mirror_only(tmp_path, "bank-c", [("skipped", None), ("dropped", None)])  # pre-flight refusals
    refused = mirror_only(tmp_path, "bank-d", [("skipped", None), ("dropped", refusal_commitment(tmp_path, bank_d))])
    given = [paths(tmp_path)[0], paths(tmp_path)[2], never, refused]
    result = audit_ledgers(given, pins=pins)
    assert result.ok and not [f for f in result.findings if f.check == "missing-ledger"], [
        str(f) for f in result.errors
    ]
    notes = {f.bank_id: f.message for f in result.findings if f.check == "not-trained"}
    assert set(notes) == {"bank-c", "bank-d"} and all(
        f.severity == "info" for f in result.findings if f.check == "not-trained"
    )
    assert "never trained in job" in notes["bank-c"] and "1 refused" in notes["bank-d"]
    text = shown(result, tmp_path / "report")
    assert "round None" not in text and "missing-ledger" not in text
    # a bank the server saw train still needs its ledger
    run_bank(tmp_path, dp_config("bank-b"), {1: "train"})
    bank_b_mirror = paths(tmp_path)[3]
    result = audit_ledgers([*given, bank_b_mirror], pins=pins)
    [missing] = [f for f in result.errors if f.check == "missing-ledger"]
    assert missing.bank_id == "bank-b" and missing.path == bank_b_mirror


def test_a_refusal_under_a_lowered_budget_is_neither_overspent_nor_an_overspend(keys, tmp_path):  # noqa: F811
    first = make_job(keys, tmp_path, job_id="first", epsilon=8.0)
    assert train(first, bank_config(first, tmp_path, "epsilon = 8.0\n")).status is TrainStatus.OK
    # the bank lowers its budget (node-config epsilon, which may only tighten its policy) below what it spent
    policy = tmp_path / "policy.toml"
    second = make_job(keys, tmp_path, job_id="second", epsilon=8.0)
    lowered = BankConfig.from_node_config({"bank-id": "bank-0", "policy-file": str(policy), "epsilon": 1.0}, second)
    assert train(second, lowered).status is TrainStatus.REFUSED
    trained, refusal = ledger_entries(lowered)
    assert refusal["status"] == "refused" and refusal["epsilon"] == trained["epsilon"] > 1.0
    ledger = list(lowered.state_root.glob("privacy/*/ledger.jsonl"))
    for policies, budget in (({"bank-0": policy}, 1.0), (None, 8.0)):  # the policy's (lowered), or the ledger's
        result = audit_ledgers(ledger, policies=policies)
        assert result.ok, [str(f) for f in result.errors]
        summary = {b.job_id: b for b in result.banks}["second"]
        assert summary.budget == budget and summary.rounds_refused == (1,)
        text = shown(result, tmp_path / f"report-{budget}")
        assert not [w for w in OVERSPEND if w in text], [line for line in text.splitlines() if "overspen" in line]
        if policies:
            assert "this job spent nothing" in text
    findings = json.loads((tmp_path / "report-1.0" / "findings.json").read_text(encoding="utf-8"))
    assert {b["job_id"]: b["budget_source"] for b in findings["banks"]} == {"first": "policy", "second": "policy"}
