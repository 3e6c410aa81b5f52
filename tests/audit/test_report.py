"""The audit report a privacy officer signs: self-contained HTML, findings.json, sign-off.

Ledgers are written by the real writer (`fedmoe.protocol.ledger.Ledger` + `fedmoe.fl_client.ledger.round_entry`,
signed by each bank's identity key), from fedmoe.fl_client.dp's own calibration and budget check
(test_audit's helpers); crafted variants edit fields and re-chain, as test_audit does.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import stat
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console
from test_audit import N, accountant_round, dp_config, read

from fedmoe.audit import audit_ledgers, render_table
from fedmoe.audit.__main__ import main
from fedmoe.audit.canary import CanaryAuditResult
from fedmoe.audit.report import (
    CHAIN_BROKEN,
    REPORT_FILE,
    SHA256_FILE,
    _curve_groups,
    _noise_figure,
    audit_verdict,
    render_html,
    sha256_of,
    write_report,
)
from fedmoe.audit.signoff import SIGNOFF_FILE, SignOffError, sign_off, verify_sign_off
from fedmoe.audit.verify import AuditResult, BankSummary, RoundPoint
from fedmoe.crypto.identity import ConsortiumPins, generate_identity
from fedmoe.fl_client.dp import AccountantState, BudgetExceeded, HistoryEntry
from fedmoe.fl_client.dp.accountant import noise_multiplier_for, sample_rate_for
from fedmoe.fl_client.ledger import round_entry
from fedmoe.protocol.ledger import CHAIN_FIELDS, Ledger, commitment_of, mirror_entry, mirror_path

JOB = "job-report"
BANKS = ("bank-a", "bank-b", "bank-c")


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    keys = tmp_path_factory.mktemp("identities")
    return {bank: generate_identity(keys / f"{bank}.secret", bank) for bank in (*BANKS, "intruder")}


@pytest.fixture(scope="module")
def pins(identities):
    return ConsortiumPins.from_identities([identities[b] for b in BANKS])


def signer(identities, bank: str):
    identity = identities[bank]
    return identity.public_key.hex(), identity.sign


@functools.cache
def demo_round() -> HistoryEntry:
    """sigma calibrated once (22 s of PRV search) for budget 8 over 2 rounds; every demo bank uses it."""
    cfg = demo_config("bank-a")
    return HistoryEntry(noise_multiplier_for(cfg, N), sample_rate_for(cfg, N), cfg.local_steps)


def demo_config(bank: str):
    return dp_config(bank, target_epsilon=8.0, planned_rounds=2)


def run_bank(root: Path, cfg, plan: dict[int, str], identities) -> None:
    """One bank's rounds ("train", refused when over budget, or "skip"): its ledger and the mirror."""
    ledger = Ledger(root / "banks" / cfg.bank_id / "ledger.jsonl")
    mirror = Ledger(mirror_path(root / "server" / "ledger-mirror", cfg.bank_id))
    state = AccountantState.fresh(cfg)
    common = dict(job_id=JOB, bank_id=cfg.bank_id, cfg=cfg, n_samples=N, budget_epsilon=cfg.target_epsilon)
    sign = signer(identities, cfg.bank_id)
    for round_, action in plan.items():
        if action == "skip":
            mirror.append(mirror_entry(job_id=JOB, bank_id=cfg.bank_id, round=round_, server_status="skipped",
                                       commitment=None, reason="not connected"))  # fmt: skip
            ledger.append(round_entry(round=round_, status="skipped", report=None, state=state, **common), signer=sign)
            continue
        try:
            report = accountant_round(cfg, state, demo_round())
        except BudgetExceeded as err:
            entry = round_entry(round=round_, status="refused", report=None, state=state,
                                planned=demo_round(), reason=str(err), **common)  # fmt: skip
        else:
            entry = round_entry(round=round_, status="trained", report=report, **common)
            state = report.accountant_state
        stored = ledger.append(entry, signer=sign)
        commitment = commitment_of(stored, exhausted=entry["status"] == "refused")
        mirror.append(mirror_entry(job_id=JOB, bank_id=cfg.bank_id, round=round_, server_status="received",
                                   commitment=commitment))  # fmt: skip


def job_paths(root: Path, banks=BANKS) -> list[Path]:
    return [root / "banks" / b / "ledger.jsonl" for b in banks] + [
        root / "server" / "ledger-mirror" / f"{b}.jsonl" for b in banks
    ]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, identities) -> Path:
    """Like the demo: three banks with budget 8; a and b identical (3rd round refused), c skips round 2."""
    root = tmp_path_factory.mktemp("demo")
    three = {1: "train", 2: "train", 3: "train"}
    for bank in ("bank-a", "bank-b"):
        run_bank(root, demo_config(bank), three, identities)
    run_bank(root, demo_config("bank-c"), {**three, 2: "skip"}, identities)
    return root


def rechain(path: Path, entries: list[dict], sign=None) -> None:
    """`entries` as a valid chain, signed by `sign` (a bank's signer, another key, or None)."""
    path.unlink(missing_ok=True)
    ledger = Ledger(path)
    for entry in entries:
        ledger.append({k: v for k, v in entry.items() if k not in (*CHAIN_FIELDS, "signer", "signature")}, signer=sign)


class _Links(HTMLParser):
    """Every src/href attribute of a page, with its tag."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.links += [(tag, name, value or "") for name, value in attrs if name in ("src", "href", "srcset")]


# ---------------------------------------------------------------------------------------------


def test_report_is_one_self_contained_file_with_embedded_plots(demo, pins, tmp_path):
    result = audit_ledgers(job_paths(demo), pins=pins)
    assert result.ok, [str(f) for f in result.findings]
    files = write_report(result, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["findings.json", REPORT_FILE, SHA256_FILE]
    page = files.html.read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(page)
    assert parser.links and all(tag == "img" and name == "src" for tag, name, _ in parser.links), parser.links
    for _, _, value in parser.links:
        assert value.startswith("data:image/png;base64,")
        assert base64.b64decode(value.split(",", 1)[1]).startswith(b"\x89PNG")
    assert "url(" not in page and "<script" not in page and "<link" not in page and "@media print" in page
    # sigma and q are the same every round: no noise plot, a sentence instead
    assert len(parser.links) == 1 and "No noise plot" in page
    assert (tmp_path / "out" / SHA256_FILE).read_text() == f"{files.sha256}  {REPORT_FILE}\n"
    assert sha256_of(files.html) == files.sha256


def test_report_explains_itself_job_definitions_rounds_and_hashes(demo, pins, tmp_path, monkeypatch):
    monkeypatch.chdir(demo)  # ledgers named relative to here: the report names them absolute
    result = audit_ledgers([p.relative_to(demo) for p in job_paths(demo)], pins=pins)
    page = write_report(result, tmp_path).html.read_text(encoding="utf-8")
    assert page.index("AUDIT PASSED") < page.index("The job")
    for text in ("ε (epsilon)", "δ (delta)", "σ (noise multiplier)", "q (sample rate)", "PRV", "PLD", "RDP",
                 "Which ε counts", "not</em> an overspend"):  # fmt: skip
        assert text in page, text
    entry = read(demo / "banks" / "bank-a" / "ledger.jsonl")[0]
    for text in (JOB, entry["versions"]["torch"], entry["written_at"][:10], "dataset size n", "clip norm C",
                 "privacy unit", "csprng", "secure mode"):  # fmt: skip
        assert text in page, text
    for bank in result.banks:  # a per-round table per bank, with its ledger made absolute
        assert not Path(bank.authority).is_absolute() and f"<code class=path>{bank.authority}</code>" not in page
        assert f"<code class=path>{demo / bank.authority}</code>" in page and bank.head_hash in page
    assert page.count("<h3>bank-") == 3 and "refused" in page and "skipped" in page
    assert "Not run." in page  # the empirical audit


def test_identical_banks_share_one_curve_and_distinct_ones_do_not(demo, pins):
    result = audit_ledgers(job_paths(demo), pins=pins)
    groups = _curve_groups(result.banks, lambda p: p.epsilon)
    assert sorted([b.bank_id for b in g] for g in groups) == [["bank-a", "bank-b"], ["bank-c"]]


def crafted_job(root: Path, demo: Path, identities) -> list[Path]:
    """The demo's ledgers edited so that every flag fires once, each at a known bank and round."""
    a, b, c = (root / "banks" / bank / "ledger.jsonl" for bank in BANKS)
    entries = read(demo / "banks" / "bank-a" / "ledger.jsonl")
    entries[0]["noise_source"] = "seeded"  # round 1
    entries[1]["status"] = "non-private"  # round 2
    rechain(a, entries, signer(identities, "bank-a"))  # round 4 stays refused
    entries = read(demo / "banks" / "bank-b" / "ledger.jsonl")
    for entry in entries:
        entry["delta"] = 0.05  # > 1/n = 1/48
        entry["budget_epsilon"] = 5.0  # round 2 (epsilon > 5) overspends
    rechain(b, entries[:1], None)  # ... and round 1 without a signature
    ledger = Ledger(b)
    ledger.append(
        {k: v for k, v in entries[1].items() if k not in (*CHAIN_FIELDS, "signer", "signature")},
        signer=signer(identities, "intruder"),
    )  # fmt: skip (round 2 signed by another key)
    for entry in entries[2:]:
        ledger.append({k: v for k, v in entry.items() if k not in (*CHAIN_FIELDS, "signer", "signature")},
                      signer=signer(identities, "bank-b"))  # fmt: skip
    mirror_c = root / "server" / "ledger-mirror" / "bank-c.jsonl"
    mirror_c.parent.mkdir(parents=True)
    mirror_c.write_bytes((demo / "server" / "ledger-mirror" / "bank-c.jsonl").read_bytes())
    return [a, b, mirror_c]  # bank-c's own ledger is missing


def test_findings_json_lists_every_flag_with_what_to_do(demo, identities, pins, tmp_path):
    paths = crafted_job(tmp_path / "job", demo, identities)
    result = audit_ledgers(paths, pins=pins)
    files = write_report(result, tmp_path / "out")
    document = json.loads(files.findings.read_text(encoding="utf-8"))
    assert document["verdict"] == "FAILED" and document["report"]["sha256"] == files.sha256
    flags = document["findings"]
    for flag in flags:
        assert set(flag) == {"severity", "check", "file", "line", "bank", "round", "message", "what_to_do"}
        assert flag["what_to_do"] and Path(flag["file"]).is_absolute()
    found = {(f["check"], f["bank"], f["round"]) for f in flags}
    for expected in (
        ("seeded-noise", "bank-a", 1),
        ("non-private", "bank-a", 2),
        ("refused-round", "bank-a", 3),
        ("delta", "bank-b", 1),
        ("missing-signature", "bank-b", 1),
        ("bad-signature", "bank-b", 2),
        ("budget", "bank-b", 2),
        ("missing-ledger", "bank-c", None),
    ):
        assert expected in found, (expected, sorted(found))
    severities = [f["severity"] for f in flags]
    assert severities == sorted(severities, key=["error", "warning", "info"].index)  # failed checks first
    assert document["reasons"][0].startswith("FAILED [")
    page = files.html.read_text(encoding="utf-8")
    for check in ("seeded-noise", "non-private", "missing-ledger", "bad-signature", "refused-round"):
        assert f"<code class=check>{check}</code>" in page
    # seeded noise or a non-private round: no budget left is shown as if it meant something
    [bank_a] = [b for b in document["banks"] if b["bank_id"] == "bank-a"]
    assert bank_a["remaining"] is None and bank_a["remaining_note"] == "n/a — seeded noise"


def test_a_broken_chain_shows_no_remaining_budget(demo, pins, tmp_path):
    paths = job_paths(demo)
    copy = tmp_path / "bank-a" / "ledger.jsonl"
    copy.parent.mkdir()
    lines = paths[0].read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = lines[2].replace('"round":3', '"round":9')  # line 3 edited by hand
    copy.write_text("".join(lines), encoding="utf-8")
    result = audit_ledgers([copy, *paths[1:3], *paths[3:]], pins=pins)
    [bank] = [b for b in result.banks if b.bank_id == "bank-a"]
    files = write_report(result, tmp_path / "out")
    page = files.html.read_text(encoding="utf-8")
    assert CHAIN_BROKEN in page and "broken at line 3" in page
    row = page[page.index("<tr><td class=name>bank-a</td>") :]
    row = row[: row.index("</tr>")]  # bank-a's row in the Banks table
    rounds = page[page.index("<h3>bank-a") :]
    rounds = rounds[: rounds.index("</table>")]  # bank-a's per-round table
    assert CHAIN_BROKEN in row and rounds.count(CHAIN_BROKEN) == len(bank.points)
    assert f"{bank.remaining:.4f}" not in row and f"{bank.remaining:.3f}" not in rounds
    [summary] = [b for b in json.loads(files.findings.read_text())["banks"] if b["bank_id"] == "bank-a"]
    assert summary["remaining"] is None and summary["remaining_note"] == CHAIN_BROKEN
    console = Console(record=True, width=250)
    render_table(result, console)
    assert CHAIN_BROKEN in console.export_text() and f"{bank.remaining:.3f}" not in console.export_text()


def test_sign_off_round_trips_and_catches_any_change(demo, pins, tmp_path):
    out, key = tmp_path / "out", tmp_path / "officer" / "key.secret"
    write_report(audit_ledgers(job_paths(demo), pins=pins), out)
    path = sign_off(out, officer="Dana Officer", key_path=key)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    check = verify_sign_off(out, ledgers=job_paths(demo))
    assert check.ok, check.problems
    signed = check.signed
    assert signed["officer"] == "Dana Officer" and signed["verdict"] == "passed"
    assert signed["report"]["sha256"] == sha256_of(out / REPORT_FILE) and signed["signed_at"].endswith("Z")
    assert {entry["head_hash"] for entry in signed["ledgers"]} >= {
        b.head_hash for b in audit_ledgers(job_paths(demo)).banks
    }
    assert verify_sign_off(out, public_key=signed["public_key"]).ok

    page = (out / REPORT_FILE).read_bytes()
    (out / REPORT_FILE).write_bytes(page[:-2] + bytes([page[-2] ^ 1]) + page[-1:])  # one byte edited
    check = verify_sign_off(out)
    assert not check.ok and "report.html: SHA-256 expected" in check.problems[0]
    (out / REPORT_FILE).write_bytes(page)
    assert verify_sign_off(out).ok

    document = json.loads(path.read_text(encoding="utf-8"))
    document["signed"]["verdict"] = "failed"  # tampered statement
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(SignOffError, match="signature does not verify"):
        verify_sign_off(out)
    document["signed"]["verdict"] = "passed"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(SignOffError, match="expected the officer's key"):
        verify_sign_off(out, public_key="00" * 32)
    with pytest.raises(SignOffError, match="made for 'Dana Officer', got --sign-off 'Eve'"):
        sign_off(out, officer="Eve", key_path=key)


def test_cli_signs_off_refuses_a_failed_audit_and_verifies(demo, identities, tmp_path, capsys):
    key = tmp_path / "officer.secret"
    out = tmp_path / "out"
    ledgers = [str(p) for p in job_paths(demo)]
    assert main([*ledgers, "--no-pins", "--out", str(out), "--sign-off", "Dana", "--officer-key", str(key)]) == 0
    printed = capsys.readouterr().out
    assert f"report SHA-256: {sha256_of(out / REPORT_FILE)}" in printed and "signed off:" in printed
    assert main(["--verify-sign-off", str(out), *ledgers]) == 0
    assert "sign-off verifies: Dana signed the report as passed" in capsys.readouterr().out

    failed = tmp_path / "failed"
    paths = [str(p) for p in crafted_job(tmp_path / "job", demo, identities)]
    assert main([*paths, "--no-pins", "--out", str(failed), "--sign-off", "Dana", "--officer-key", str(key)]) == 1
    assert "sign-off refused" in capsys.readouterr().out and not (failed / SIGNOFF_FILE).exists()
    args = [*paths, "--no-pins", "--out", str(failed), "--sign-off", "Dana", "--officer-key", str(key)]
    args.append("--sign-off-failed")
    assert main(args) == 1 and (failed / SIGNOFF_FILE).exists()
    assert "as failed" in json.loads((failed / SIGNOFF_FILE).read_text())["signed"]["statement"]
    capsys.readouterr()
    (failed / REPORT_FILE).write_text("edited", encoding="utf-8")
    assert main(["--verify-sign-off", str(failed)]) == 1
    assert "sign-off does NOT verify" in capsys.readouterr().out


def test_the_empirical_audit_is_labelled_with_what_it_tested(demo, pins, tmp_path):
    canary = CanaryAuditResult(
        canaries=1000, in_canaries=490, k_plus=250, k_minus=0, guesses=250, correct=136, confidence=0.95,
        delta=1e-5, epsilon_lower_bound=0.0, claimed_epsilon=1.991, p_value_at_claim=1.0, noise_multiplier=1.592,
        sample_rate=0.108, steps=30, n_samples=590, fault_injected=False, seconds=40.0, max_certifiable_epsilon=4.39,
        controls=((3.98, 1.05, 2.5),),  # a PASS needs a refuted positive control (issue 26)
    )  # fmt: skip
    result = audit_ledgers(job_paths(demo), pins=pins).with_empirical(canary)
    files = write_report(result, tmp_path)
    page = files.html.read_text(encoding="utf-8")
    assert "What it tested is not this job's configuration" in page and "<em>tiny</em> model" in page
    assert "largest ε it can certify" in page and "4.39" in page and "Not run." not in page
    [empirical] = json.loads(files.findings.read_text())["empirical"]
    assert empirical["verdict"] == "PASS" and "not the job's configuration" in empirical["tested"]


def bank_with_sigmas(bank: str, sigmas: list[float]) -> BankSummary:
    points = tuple(
        RoundPoint(
            round=r,
            status="trained",
            epsilon=float(r),
            epsilon_pld=float(r),
            noise_multiplier=s,
            sample_rate=0.1,
            steps=2,
            source=f"/x/{bank}/ledger.jsonl:{r}",
        )  # fmt: skip
        for r, s in enumerate(sigmas, start=1)
    )
    return BankSummary(
        job_id=JOB, bank_id=bank, accountant="prv", delta=1e-5, budget=8.0, authority=f"/x/{bank}/ledger.jsonl",
        points=points, rounds_trained=tuple(range(1, len(sigmas) + 1)), rounds_refused=(), rounds_skipped=(),
        rounds_dropped=(), epsilon_recorded=float(len(sigmas)), epsilon_pld=float(len(sigmas)),
        epsilon_rdp=float(len(sigmas)) * 1.2, ok=True,
    )  # fmt: skip


def test_the_noise_plot_is_drawn_only_when_sigma_or_q_changes():
    constant = AuditResult(
        files=(), banks=(bank_with_sigmas("a", [1.0, 1.0]), bank_with_sigmas("b", [2.0, 2.0])), findings=()
    )
    assert _noise_figure(constant) is None
    varying = AuditResult(
        files=(), banks=(bank_with_sigmas("a", [1.0, 1.2]), bank_with_sigmas("b", [2.0, 2.0])), findings=()
    )
    assert _noise_figure(varying).startswith("data:image/png;base64,")
    assert "No noise plot" not in render_html(varying, [], audit_verdict(varying, []), "2026-01-01T00:00:00Z")
