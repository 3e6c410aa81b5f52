"""Showing an AuditResult: a console table, and a self-contained report a privacy officer can sign.

    <out>/report.html         one file, nothing external: the verdict and its reasons (failed
                              checks first), the job (ids, dates, versions, n, C, unit, δ, noise
                              source), definitions in plain words, one table per bank and per
                              round, every flag with what to do, the empirical audit (or that it
                              was not run), the ledger head hashes; plots embedded as
                              data:image/png;base64 URIs; print CSS for "Save as PDF"
    <out>/findings.json       the same verdict, flags, banks and files, machine-readable
    <out>/report.html.sha256  SHA-256 of report.html (`sha256sum -c` format): the page cannot hold
                              its own hash; findings.json and a sign-off (fedmoe.audit.signoff) carry it

Flags are verify.py's findings plus notes the report adds (a round a bank refused, a round that
failed); each `check` maps to one line of what to do (`WHAT_TO_DO`). matplotlib is used through
its object API (Figure, Agg canvas: no pyplot, no global backend switch), imported only when a
report is written.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedmoe.audit.policy_check import SPENDING_STATUSES
from fedmoe.audit.verify import AuditResult, BankSummary, Finding, LedgerFile, RoundPoint

REPORT_FILE = "report.html"
FINDINGS_FILE = "findings.json"
SHA256_FILE = "report.html.sha256"
FINDINGS_SCHEMA = "fedmoe.audit.findings/1"
CHAIN_BROKEN = "n/a — chain broken"

# One line of what to do per check (verify.py's check names, plus the report's own notes).
WHAT_TO_DO: dict[str, str] = {
    "chain": "The file was edited, cut or rewritten after it was written: get an intact copy from the party that "
    "holds it and find out who changed it; nothing from the named line on can be trusted.",
    "schema": "An entry lacks a field or has the wrong type: ask the bank which software wrote it; its ε cannot be "
    "verified until then.",
    "poisson": "Batches were not Poisson-sampled, so the recorded ε does not hold: stop the bank's private jobs "
    "until its sampler is fixed.",
    "history": "The accountant history does not match the rounds recorded: ask the bank for its accountant state "
    "and trust no remaining budget of this bank until it is explained.",
    "epsilon": "A recorded ε disagrees with the independent recomputation: count the larger value as spent and "
    "ask the bank for its accountant state and library versions.",
    "budget": "ε above the bank's budget: stop training on this dataset, record the overspend, and find out why "
    "the bank's own budget check did not refuse.",
    "budget-changed": "The bank's budget changed between entries (a new policy): confirm the change was approved; "
    "the ε already spent counts against the new budget.",
    "sequence": "Rounds out of order, or job, bank, accountant or δ changed inside one ledger: ask the bank to "
    "explain (a round recorded twice after a restart counts twice and is only a warning).",
    "mirror": "The server's mirror is inconsistent: get an intact copy from the server operator; until then the "
    "bank's ledger is not anchored against deleted or rewritten lines.",
    "cross-check": "The bank's ledger differs from what the server mirrored (lines deleted or rewritten): get the "
    "original ledger from the bank and ask it to explain the difference.",
    "missing-ledger": "The server mirrored rounds a bank trained, but its ledger was not given: obtain that bank's "
    "ledger.jsonl (fedmoe site officer-bundle) and run the audit again; its ε cannot be checked without it.",
    "not-trained": "No action needed for this job: the bank trained in none of its rounds. Its lifetime ε is audited "
    "from its own ledger (fedmoe site officer-bundle).",
    "seeded-noise": "Noise was seeded (predictable): set seeded-noise = false in the bank's policy and treat this "
    "dataset's released updates as not private.",
    "non-private": "A round trained without DP: set allow-no-dp = false in the bank's policy and treat that "
    "round's updates as disclosed.",
    "delta": "δ is above 1/n: lower max-delta in the bank's policy well below 1/n (e.g. 1/(10·n)).",
    "missing-signature": "An entry carries no bank signature, so nothing proves the bank wrote it: provision the "
    "bank's identity key and have its entries signed.",
    "bad-signature": "A signature does not verify under the bank's pinned key: treat the ledger as forged, get the "
    "original from the bank and check the pins file.",
    "signature": "Signatures were not checked against pinned keys: run the audit again with --pins FILE to prove "
    "which bank wrote each entry.",
    "named-poisoner": "The consortium's banks found this bank's masked input of a quarantined round out of bound and "
    "signed verdicts naming it; the server excluded it from the job. The evidence, the reveals and the verdicts are "
    "in the server's <job>/accountability/round-NNNN/ (anyone holding the BFV key re-checks them); decide with the "
    "consortium whether the bank stays pinned.",
    "dataset-identity": "One dataset has several ledgers (its lifetime budget was reset): count their composed ε "
    "as spent, stop training on this dataset if it is above the budget, and have the bank set 'dataset-id'.",
    "record-level": "The bank chose record-level DP on data with customer ids: confirm that protecting single "
    "records (not a customer's whole history) is what the bank intends.",
    "dataset-changed": "Rows were added to the dataset under the same ledger: confirm with the bank; one budget "
    "covers both versions.",
    "policy-file": "The bank's policy file is missing or unreadable: get the policy that was in force from the bank.",
    "policy-hash": "The entry was written under another policy than the file given: get the policy that was in "
    "force at that time, and find out who changed it.",
    "policy-overrides": "Node-config loosened the bank's policy: remove the override; count the ε spent above the "
    "policy as overspent.",
    "policy-noise": "σ below the policy's floor: stop the bank's private jobs and find out why its policy check "
    "did not refuse.",
    "policy-clip": "Clip norm outside the policy's range: stop the bank's private jobs and find out why its policy "
    "check did not refuse.",
    "policy-delta": "δ above the policy's max-delta: stop the bank's private jobs and find out why its policy check "
    "did not refuse.",
    "policy-unit": "A weaker privacy unit than the policy's: treat those rounds as protecting only that unit.",
    "policy-budget": "Budget or ε above the policy's lifetime ε: stop training on this dataset and record the "
    "overspend.",
    "policy-noise-source": "Predictable noise or no DP without the policy allowing it: treat those releases as "
    "not private.",
    "refused-round": "No action needed: the bank refused this round (its policy or its budget check: the reason "
    "names the rule) and nothing was spent.",
    "failed-round": "Nothing was spent; if rounds keep failing, ask the bank for its logs.",
    "empirical": "The DP-SGD code leaked more than its accountant claims: stop all private training until "
    "clipping, noise and sampling are fixed.",
}
_DEFAULT_ADVICE = "Read the message; ask the party that wrote the file named."
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}

DEFINITIONS: tuple[tuple[str, str], ...] = (
    (
        "ε (epsilon)",
        "How much one person's data (one record, or one customer) can change anything learned from what the bank "
        "released: with or without it, every outcome's probability differs by at most a factor e^ε. Smaller is "
        "more private; the budget is the largest ε a bank allows for its dataset over all jobs.",
    ),
    (
        "δ (delta)",
        "The small probability that the ε promise does not hold. It must be far below 1/n (n = records or "
        "customers in the dataset), otherwise one whole record could be released outright.",
    ),
    (
        "σ (noise multiplier)",
        "How much random noise is added: each person's gradient is clipped to length C (the clip norm) and Gaussian "
        "noise of standard deviation σ·C is added to their sum. More noise, smaller ε.",
    ),
    (
        "q (sample rate)",
        "The chance that a given record is in one training step's batch (each record is drawn independently: "
        "Poisson sampling); q = expected batch / n.",
    ),
    (
        "accountant",
        "The method that adds up the privacy cost of every step of every round into one ε.",
    ),
    (
        "PRV",
        "Privacy random variable accountant (Gopi et al. 2021, in Opacus): computes ε almost exactly, an upper "
        "bound at most 0.01 above the true value. Banks use it by default and enforce their budget with it.",
    ),
    (
        "PLD",
        "Privacy loss distribution accountant (Google's dp_accounting): the same exact calculation by another "
        "library. This audit recomputes every ε with it from the recorded σ, q and steps, trusting no number the "
        "bank wrote.",
    ),
    (
        "RDP",
        "Rényi differential privacy accountant (Mironov 2017): an older method that is simpler but gives a looser "
        "upper bound, typically 10–30% above PRV/PLD for the same training.",
    ),
    (
        "Which ε counts",
        "ε by PRV or PLD is the number that counts, because both compute the tight guarantee of what was "
        "actually run. ε by RDP is only an upper bound: true, but loose, so an RDP value above the budget is not "
        "an overspend when PRV/PLD are within it (a bank that accounts with RDP is simply more conservative).",
    ),
)


# ---------------------------------------------------------------------------------------------
# Flags and the verdict
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One line of findings.json: a verify.py finding or a report note, with what to do."""

    severity: str  # "error" (fails the audit), "warning", or "info" (a note)
    check: str
    file: str | None  # absolute path
    line: int | None
    bank: str | None
    round: int | None
    message: str
    what_to_do: str

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}" if self.file and self.line else (self.file or "-")


def _absolute(path: str | os.PathLike[str]) -> str:
    return str(Path(path).absolute())


def _split_advice(message: str) -> tuple[str, str | None]:
    """verify.py ends some messages with 'What to do: ...': keep that specific advice apart."""
    text, marker, advice = message.partition("What to do:")
    advice = advice.strip()
    return (text.rstrip(" .") + ".", advice[:1].upper() + advice[1:]) if marker else (message, None)


def _bank_of(finding: Finding, result: AuditResult) -> str | None:
    """The finding's bank, or the only bank of the file it names (a missing-ledger mirror)."""
    if finding.bank_id is not None:
        return finding.bank_id
    banks = {b for f in result.files if f.path == finding.path for b in f.bank_ids}
    return banks.pop() if len(banks) == 1 else None


def _finding_flag(finding: Finding, result: AuditResult) -> Flag:
    message, advice = _split_advice(finding.message)
    return Flag(
        severity=finding.severity,
        check=finding.check,
        file=_absolute(finding.path),
        line=finding.line,
        bank=_bank_of(finding, result),
        round=finding.round,
        message=message,
        what_to_do=advice or WHAT_TO_DO.get(finding.check, _DEFAULT_ADVICE),
    )


def _round_notes(bank: BankSummary) -> list[Flag]:
    """Rounds a bank refused or that failed: not failures of the audit, but worth a line."""
    notes = []
    for point, entry in _with_entries(bank):
        if point.status not in ("refused", "failed"):
            continue
        path, _, line = point.source.rpartition(":")
        reason = str(entry.get("reason") or "no reason recorded")
        verb = "refused by the bank" if point.status == "refused" else "failed at the bank"
        notes.append(
            Flag(
                severity="info",
                check=f"{point.status}-round",
                file=_absolute(path),
                line=int(line) if line.isdigit() else None,
                bank=bank.bank_id,
                round=point.round,
                message=f"round {point.round} {verb}; nothing spent ({reason})",
                what_to_do=WHAT_TO_DO[f"{point.status}-round"],
            )
        )
    return notes


def _empirical_flags(result: AuditResult) -> list[Flag]:
    flags = []
    for emp in result.empirical:
        if emp.verdict == "PASS":
            continue
        flags.append(
            Flag(
                severity="error" if emp.verdict == "FAIL" else "warning",
                check="empirical",
                file=None,
                line=None,
                bank=None,
                round=None,
                message=f"empirical canary audit {emp.summary()}",
                what_to_do=WHAT_TO_DO["empirical"]
                if emp.verdict == "FAIL"
                else f"Nothing is refuted, but nothing is shown either: the audit did not catch a mechanism at "
                f"{emp.control_factor:g}x the claim (and with m = {emp.canaries} canaries cannot certify ε above "
                f"{emp.max_certifiable_epsilon:.2f}); rely on the accountant and the code's tests, or rerun with "
                "more canaries.",
            )
        )
    return flags


def report_flags(result: AuditResult) -> list[Flag]:
    """Every flag of the audit, errors first, then warnings, then notes (stable within each)."""
    flags = [_finding_flag(f, result) for f in result.findings]
    flags += _empirical_flags(result)
    for bank in result.banks:
        flags += _round_notes(bank)
    return sorted(flags, key=lambda f: _SEVERITY_ORDER.get(f.severity, 3))


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]

    @property
    def headline(self) -> str:
        return "AUDIT PASSED" if self.passed else "AUDIT FAILED"


def _group_by_check(flags: Iterable[Flag]) -> dict[str, list[Flag]]:
    groups: dict[str, list[Flag]] = {}
    for flag in flags:
        groups.setdefault(flag.check, []).append(flag)
    return groups


def _short(flag: Flag) -> str:
    """folder/file:line (the full path is in the flags table)."""
    if flag.file is None:
        return "-"
    path = Path(flag.file)
    return f"{path.parent.name}/{path.name}" + (f":{flag.line}" if flag.line else "")


def audit_verdict(result: AuditResult, flags: list[Flag]) -> Verdict:
    """Passed or failed, and why: failed checks first (one reason per check), then the rest."""
    reasons = []
    for severity, word in (("error", "FAILED"), ("warning", "warning")):
        for check, group in _group_by_check(f for f in flags if f.severity == severity).items():
            where = ", ".join(sorted({_short(f) for f in group})[:3])
            more = f" (+{len(group) - 1} more)" if len(group) > 1 else ""
            reasons.append(f"{word} [{check}] {group[0].message}{more} — at {where}")
    for check, group in _group_by_check(f for f in flags if f.severity == "info").items():
        where = ", ".join(str(f.bank) + ("" if f.round is None else f" round {f.round}") for f in group)
        reasons.append(f"note [{check}] {len(group)} ({where}): {group[0].what_to_do}")
    if result.ok:
        chains = sum(f.chain.ok for f in result.files)
        reasons.insert(
            0,
            f"passed: all {chains} ledger chain(s) verify, every ε was recomputed within tolerance and every bank "
            "is within its budget; no seeded noise, no non-private round, no δ above 1/n",
        )
    return Verdict(result.ok, tuple(reasons))


# ---------------------------------------------------------------------------------------------
# Per-bank helpers
# ---------------------------------------------------------------------------------------------


def _label(bank: BankSummary, result: AuditResult) -> str:
    jobs = {b.job_id for b in result.banks}
    return bank.bank_id if len(jobs) <= 1 else f"{bank.bank_id} ({bank.job_id})"


def _rounds(rounds: tuple[int, ...]) -> str:
    return ", ".join(map(str, rounds)) if rounds else "-"


def _with_entries(bank: BankSummary) -> list[tuple[RoundPoint, dict[str, Any]]]:
    """Each RoundPoint with the raw entry behind it (verify.py builds both from the same lines)."""
    entries = list(bank.entries) + [{}] * (len(bank.points) - len(bank.entries))
    return list(zip(bank.points, entries, strict=False))


def broken_chains(bank: BankSummary, result: AuditResult) -> list[LedgerFile]:
    """Files holding this bank's entries (its ledger, its mirror) whose hash chain is broken."""
    return [
        f
        for f in result.files
        if not f.chain.ok
        and (str(f.path) == bank.authority or (bank.bank_id in f.bank_ids and bank.job_id in f.job_ids))
    ]


def _unbounded(bank: BankSummary) -> str | None:
    """Why this bank's ε protects nobody whatever its value (seeded noise, a non-private round)."""
    if any(e.get("noise_source") == "seeded" for e in bank.entries):
        return "n/a — seeded noise"
    if any(e.get("status") == "non-private" for e in bank.entries):
        return "n/a — non-private round"
    return None


def _left_text(left: float, digits: int, refused: str) -> str:
    """A budget left; below 0 an overspend, unless `refused` says why nothing was spent there (the budget
    was lowered below what earlier rounds spent, and the bank's check refused: that is no overspend)."""
    text = f"{left:.{digits}f}"
    return text if left >= 0 else text + f" ({refused or 'overspent'})"


def _overspent(bank: BankSummary) -> bool:
    return bank.remaining < 0 and bank.spent_in_job


def remaining_text(bank: BankSummary, result: AuditResult, digits: int = 3) -> str:
    """Budget left, or why no number can be shown (a broken chain, seeded noise, no DP)."""
    if broken_chains(bank, result):
        return CHAIN_BROKEN
    refused = "" if bank.spent_in_job else "spent in earlier jobs; this job spent nothing"
    return _unbounded(bank) or _left_text(bank.remaining, digits, refused)


def _round_left(bank: BankSummary, point: RoundPoint, result: AuditResult) -> str:
    if broken_chains(bank, result):
        return CHAIN_BROKEN
    left = bank.budget - max(point.epsilon, point.epsilon_pld)
    refused = "" if point.status in SPENDING_STATUSES else "spent earlier; this round spent nothing"
    return _unbounded(bank) or _left_text(left, 3, refused)


def _distinct(values: Iterable[Any]) -> str:
    seen: list[str] = []
    for value in values:
        if isinstance(value, bool):
            text = "yes" if value else "no"
        else:
            text = "-" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))
        if text not in seen:
            seen.append(text)
    return " → ".join(seen) if seen else "-"


def _constant(values: list[float | None]) -> bool:
    present = [v for v in values if v is not None]
    return all(math.isclose(v, present[0], rel_tol=1e-9) for v in present)


# ---------------------------------------------------------------------------------------------
# Console
# ---------------------------------------------------------------------------------------------


def render_table(result: AuditResult, console: Console) -> None:
    """Prints the per-bank table, the flags with what to do, the empirical audit and the verdict."""
    table = Table(title="privacy ledger audit: epsilon per bank", title_justify="left")
    for name, justify in (
        ("bank", "left"),
        ("acct", "left"),
        ("δ", "right"),
        ("rounds joined", "left"),
        ("refused/skipped/dropped", "left"),
        ("ε spent", "right"),
        ("ε PLD", "right"),
        ("ε RDP (bound)", "right"),
        ("budget", "right"),
        ("remaining", "right"),
        ("checks", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name in ("bank", "δ"))
    table.caption = (
        "ε spent: the bank's accountant, as recorded; ε PLD: recomputed here from the histories (the number that "
        "counts); ε RDP: a looser upper bound, not an overspend when above the budget; budget: the bank's policy "
        "(--policy), * the largest its ledger records"
    )
    for bank in result.banks:
        other = " / ".join(_rounds(r) for r in (bank.rounds_refused, bank.rounds_skipped, bank.rounds_dropped))
        remaining = remaining_text(bank, result)
        color = "red" if remaining.startswith("n/a") or _overspent(bank) else "green"
        table.add_row(
            _label(bank, result),
            bank.accountant,
            f"{bank.delta:g}",
            _rounds(bank.rounds_trained),
            other,
            f"{bank.epsilon_recorded:.3f}",
            f"{bank.epsilon_pld:.3f}",
            f"[dim]{bank.epsilon_rdp:.3f}[/]",
            f"{bank.budget:g}" + ("" if bank.budget_source == "policy" else "*"),
            f"[{color}]{escape(remaining)}[/]",
            "[green]ok[/]" if bank.ok else "[red]FAIL[/]",
        )
    console.print(table)
    _render_files(result, console)
    flags = report_flags(result)
    colors = {"error": "red", "warning": "yellow", "info": "cyan"}
    for flag in flags:  # whole lines: file:line never broken across rows (easy to grep and click)
        console.print(
            f"[{colors.get(flag.severity, 'white')}]{flag.severity}[/] {escape(flag.location)}: "
            f"\\[{escape(flag.check)}] {escape(flag.message)} [dim]→ {escape(flag.what_to_do)}[/]",
            soft_wrap=True,
        )
    for emp in result.empirical:
        color = "green" if emp.passed else "red"
        console.print(
            f"[bold]empirical audit (tiny model; the claim's σ, q, steps through the production noise path)[/] "
            f"[{color}]{escape(emp.summary())}[/]",
            soft_wrap=True,
        )
    verdict = audit_verdict(result, flags)
    counts = f"{len(result.errors)} error(s), {len(result.warnings)} warning(s)"
    console.print(f"[bold {'green' if verdict.passed else 'red'}]{verdict.headline}[/]: {counts}")


def _render_files(result: AuditResult, console: Console) -> None:
    files = Table(title="ledger files", title_justify="left")
    for name in ("file", "kind", "entries", "chain", "head hash"):
        files.add_column(name)
    for f in result.files:
        chain = "[green]ok[/]" if f.chain.ok else f"[red]broken at line {f.chain.first_bad_line}[/]"
        files.add_row(escape(_absolute(f.path)), f.kind, str(f.chain.n_entries), chain, f.chain.last_hash[:16] + "…")
    console.print(files)


# ---------------------------------------------------------------------------------------------
# Plots (embedded as data URIs)
# ---------------------------------------------------------------------------------------------

_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h")
_LINESTYLES = ("-", "--", "-.", ":")
_BUDGET_STYLES = ((0, (6, 3)), (0, (2, 2)), (0, (8, 2, 2, 2)), (0, (1, 1)))


def _png_data_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _curve_groups(banks: Iterable[BankSummary], value) -> list[list[BankSummary]]:
    """Banks whose curves are identical (same rounds, values to 1e-3, budget) share one line."""
    groups: dict[tuple, list[BankSummary]] = {}
    for bank in banks:
        key = (tuple((p.round, p.status == "trained", _rounded(value(p))) for p in bank.points), bank.budget)
        groups.setdefault(key, []).append(bank)
    return list(groups.values())


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def _group_label(group: list[BankSummary], result: AuditResult) -> str:
    names = ", ".join(_label(b, result) for b in group)
    return names + (" (identical)" if len(group) > 1 else "")


def _offsets(n: int, width: float = 0.16) -> list[float]:
    """Small sideways shifts so overlapping curves stay visible (0 for a single curve)."""
    return [0.0] if n == 1 else [width * (i / (n - 1) - 0.5) for i in range(n)]


def _epsilon_figure(result: AuditResult) -> str:
    """ε per bank per round (the bank's accountant) against one line per distinct budget."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 4.8), dpi=110, layout="constrained")  # no pyplot: no global state
    ax = fig.subplots()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = _curve_groups(result.banks, lambda p: p.epsilon)
    any_untrained, any_no_dp, top = False, False, 0.0
    for i, (group, dx) in enumerate(zip(groups, _offsets(len(groups)), strict=True)):
        points, color, marker = group[0].points, colors[i % len(colors)], _MARKERS[i % len(_MARKERS)]
        xs, ys = [p.round + dx for p in points], [p.epsilon for p in points]
        trained = [j for j, p in enumerate(points) if p.status == "trained"]
        ax.plot(xs, ys, color=color, ls=_LINESTYLES[i % len(_LINESTYLES)], lw=2, marker=marker, ms=8,
                markevery=trained, label=_group_label(group, result))  # fmt: skip
        no_dp = [j for j, p in enumerate(points) if p.status == "non-private"]
        if no_dp:  # trained without DP: its epsilon means nothing
            any_no_dp = True
            ax.plot([xs[j] for j in no_dp], [ys[j] for j in no_dp], ls="none", marker="X", ms=12, color="#cf222e")
        idle = [j for j, p in enumerate(points) if p.status not in ("trained", "non-private")]
        if idle:
            any_untrained = True
            ax.plot([xs[j] for j in idle], [ys[j] for j in idle], ls="none", marker=marker, ms=8, mfc="white",
                    mec=color, mew=2)  # fmt: skip
        top = max([top, *ys])
    budgets: dict[float, list[BankSummary]] = {}
    for bank in result.banks:
        budgets.setdefault(bank.budget, []).append(bank)
    for k, (budget, banks) in enumerate(sorted(budgets.items())):
        names = ", ".join(_label(b, result) for b in banks)
        ax.axhline(budget, color="#b71c1c", lw=1.5, ls=_BUDGET_STYLES[k % len(_BUDGET_STYLES)],
                   label=f"budget ε = {budget:g} ({names})")  # fmt: skip
        top = max(top, budget)
    handles, labels = ax.get_legend_handles_labels()
    if any_untrained:
        handles.append(Line2D([], [], ls="none", marker="o", ms=8, mfc="white", mec="#444", mew=2))
        labels.append("hollow marker: round not trained (refused / skipped / dropped / failed): nothing spent")
    if any_no_dp:
        handles.append(Line2D([], [], ls="none", marker="X", ms=10, color="#cf222e"))
        labels.append("red X: round trained WITHOUT differential privacy (its ε protects nothing)")
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round", fontsize=11)
    ax.set_ylabel("ε spent so far (bank's accountant)", fontsize=11)
    ax.set_title("Privacy spent per bank after each round, against its budget", fontsize=12)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles, labels, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    return _png_data_uri(fig)


def _mechanism_varies(result: AuditResult) -> dict[str, bool]:
    """Whether σ / q change between a bank's trained rounds (a constant is a table row, not a plot)."""
    out = {"noise_multiplier": False, "sample_rate": False}
    for bank in result.banks:
        trained = [p for p in bank.points if p.status == "trained"]
        for name in out:
            out[name] |= not _constant([getattr(p, name) for p in trained])
    return out


def _noise_figure(result: AuditResult) -> str | None:
    """σ and/or q per trained round, only for the quantities that change; None when none does."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    varies = [name for name, changed in _mechanism_varies(result).items() if changed]
    if not varies:
        return None
    titles = {"noise_multiplier": "noise multiplier σ", "sample_rate": "sample rate q"}
    fig = Figure(figsize=(9, 2.8 * len(varies) + 1), dpi=110, layout="constrained")
    axes = fig.subplots(len(varies), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, varies, strict=True):
        groups = _curve_groups(result.banks, lambda p, n=name: getattr(p, n))
        for i, (group, dx) in enumerate(zip(groups, _offsets(len(groups)), strict=True)):
            trained = [p for p in group[0].points if p.status == "trained"]
            ax.plot([p.round + dx for p in trained], [getattr(p, name) for p in trained], lw=2,
                    marker=_MARKERS[i % len(_MARKERS)], ls=_LINESTYLES[i % len(_LINESTYLES)],
                    label=_group_label(group, result))  # fmt: skip
        highest = max((getattr(p, name) or 0.0 for b in result.banks for p in b.points), default=0.0)
        ax.set_ylim(0, highest * 1.15 if highest > 0 else 1)
        ax.set_ylabel(titles[name], fontsize=11)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title("DP-SGD mechanism per trained round (only what changes between rounds)", fontsize=12)
    axes[-1].set_xlabel("round", fontsize=11)
    axes[0].legend(fontsize=9, loc="lower left")
    return _png_data_uri(fig)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_esc = html.escape

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1180px;
       padding: 0 1.5em; color: #1f2328; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.86em; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.55em; text-align: left; vertical-align: top; }
th { background: #f3f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.verdict { border: 3px solid; border-radius: 6px; padding: 0.6em 1.2em; margin: 1em 0; }
.verdict.pass { border-color: #1a7f37; background: #eaf7ee; }
.verdict.fail { border-color: #cf222e; background: #fdeeee; }
.verdict .headline { font-size: 1.6em; font-weight: bold; margin: 0.2em 0; }
.pass .headline, .ok { color: #1a7f37; } .fail .headline, .bad { color: #cf222e; font-weight: bold; }
.warn { color: #9a6700; font-weight: bold; } .info { color: #0969da; }
.muted { color: #656d76; } .small { font-size: 0.85em; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.95em; }
code.hash, code.path { word-break: break-all; } td.name, code.check { white-space: nowrap; }
dl.defs dt { font-weight: bold; margin-top: 0.5em; } dl.defs dd { margin: 0.1em 0 0 1.5em; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { font-size: 0.88em; color: #424a53; max-width: 60em; }
.kv th { width: 14em; }
@page { size: A4; margin: 14mm; }
@media print {
  body { margin: 0; max-width: none; padding: 0; font-size: 9.5pt; }
  table { font-size: 8pt; } h2 { break-after: avoid; } tr, figure, .verdict, dl.defs dd { break-inside: avoid; }
  .verdict { print-color-adjust: exact; -webkit-print-color-adjust: exact; }
}
"""


def _table(
    headers: list[str], rows: list[list[str]], numeric: Iterable[int] = (), css: str = "", names: Iterable[int] = ()
) -> str:
    """An HTML table; cells are already escaped HTML; `numeric` columns right-aligned, `names` not wrapped."""
    classes = {i: "num" for i in numeric} | {i: "name" for i in names}
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f"<td{f' class={classes[i]}' if i in classes else ''}>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table{f' class={css}' if css else ''}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _status(ok: bool) -> str:
    return '<span class="ok">ok</span>' if ok else '<span class="bad">FAIL</span>'


def _html_verdict(verdict: Verdict) -> str:
    items = []
    for reason in verdict.reasons:
        css = {"FAILED": "bad", "warning": "warn", "note": "info"}.get(reason.split(" ", 1)[0], "ok")
        head, bracket, rest = reason.partition("] ")
        head, rest = (head + bracket, rest) if bracket else reason.split(":", 1) if ":" in reason else (reason, "")
        items.append(f'<li><span class="{css}">{_esc(head)}</span> {_esc(rest)}</li>')
    return (
        f'<div class="verdict {"pass" if verdict.passed else "fail"}"><p class="headline">{verdict.headline}</p>'
        f"<ul>{''.join(items)}</ul>"
        "<p class=small>Failed checks come first; every flag, with what to do, is in "
        "<em>Flags and what to do</em> below and in findings.json.</p></div>"
    )


def _dates(result: AuditResult) -> tuple[str, str]:
    stamps = [
        str(e[key]) for b in result.banks for e in b.entries for key in ("started_at", "written_at") if e.get(key)
    ]
    return (_when(min(stamps)), _when(max(stamps))) if stamps else ("-", "-")


def _when(stamp: str) -> str:
    """2026-01-31T12:00:00.000001Z -> 2026-01-31 12:00:00 UTC (the ledger's ISO 8601 UTC stamps)."""
    return stamp.replace("T", " ").partition(".")[0].rstrip("Z") + " UTC"


def _versions(result: AuditResult) -> str:
    """Each package's version(s) over every entry; which banks ran which when they differ."""
    seen: dict[str, dict[str, set[str]]] = {}
    for bank in result.banks:
        for entry in bank.entries:
            for package, version in (entry.get("versions") or {}).items():
                seen.setdefault(package, {}).setdefault(str(version), set()).add(_label(bank, result))
    parts = []
    for package, versions in sorted(seen.items()):
        if len(versions) == 1:
            parts.append(f"{package} {next(iter(versions))}")
        else:
            each = "; ".join(f"{v} ({', '.join(sorted(b))})" for v, b in sorted(versions.items()))
            parts.append(f"{package} <span class=warn>differs</span>: {each}")
    return "<br>".join(_esc(p) if "<span" not in p else p for p in parts) or "-"


def _html_job(result: AuditResult, generated: str) -> str:
    jobs = sorted({b.job_id for b in result.banks} | {j for f in result.files for j in f.job_ids})
    first, last = _dates(result)
    rows = [
        ["job id(s)", _esc(", ".join(jobs) or "-")],
        ["banks", _esc(", ".join(sorted({b for f in result.files for b in f.bank_ids})) or "-")],
        ["first / last ledger entry", f"{_esc(first)} / {_esc(last)}"],
        ["software versions (from the entries)", _versions(result)],
        ["report generated", _esc(_when(generated))],
    ]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<h2>The job</h2><table class=kv><tbody>{body}</tbody></table>"


def _mechanism_text(bank: BankSummary, name: str, digits: str) -> str:
    values = [getattr(p, name) for p in bank.points if p.status == "trained"]
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if _constant(present):
        return f"{present[0]:{digits}} (same every round)"
    return f"{min(present):{digits}} – {max(present):{digits}} (changes: see plot)"


def _html_bank_config(result: AuditResult) -> str:
    rows = []
    for bank in result.banks:
        entries = bank.entries
        n_values = [e.get("n_samples") for e in entries]
        n = next((v for v in reversed(n_values) if isinstance(v, int)), None)
        over = n is not None and n > 0 and bank.delta > 1 / n
        rows.append(
            [
                _esc(_label(bank, result)),
                _esc(_distinct(n_values)),
                _esc(_distinct(e.get("clip_norm") for e in entries)),
                _esc(_distinct(e.get("privacy_unit") for e in entries)),
                _esc(bank.accountant),
                f"{bank.delta:g}" + (f" <span class=bad>&gt; 1/n = {1 / n:.2g}</span>" if over else ""),
                _esc(_distinct(e.get("noise_source") for e in entries)),
                _esc(_distinct(e.get("secure_mode") for e in entries)),
                _esc(_mechanism_text(bank, "noise_multiplier", ".4g")),
                _esc(_mechanism_text(bank, "sample_rate", ".4g")),
                _esc(_distinct(e.get("expected_batch_size") for e in entries)),
                f"{bank.budget:g}",
            ]
        )
    headers = ["bank", "dataset size n", "clip norm C", "privacy unit", "accountant", "δ", "noise source",
               "secure mode", "σ (trained rounds)", "q (trained rounds)", "expected batch", "budget ε"]  # fmt: skip
    return "<h3>Configuration per bank (from its ledger entries; a → b when it changed)</h3>" + _table(
        headers, rows, numeric=(1, 2, 5, 10, 11), names=(0,)
    )


def _missing_ledgers(result: AuditResult) -> list[str]:
    """Banks the server mirrored whose own ledger was not given (nothing can be recomputed)."""
    flags = [_finding_flag(f, result) for f in result.findings if f.check == "missing-ledger"]
    return sorted({f.bank or f.location for f in flags})


def _html_bank_summary(result: AuditResult) -> str:
    rows = []
    for bank in result.banks:
        rdp_is_bound = bank.accountant != "rdp"
        rdp = f"{bank.epsilon_rdp:.4f}" + ("†" if rdp_is_bound else "")
        remaining = remaining_text(bank, result, 4)
        css = "bad" if remaining.startswith("n/a") or _overspent(bank) else ""
        rows.append(
            [
                _esc(_label(bank, result)),
                _esc(_rounds(bank.rounds_trained)),
                _esc(" / ".join(_rounds(r) for r in (bank.rounds_refused, bank.rounds_skipped, bank.rounds_dropped))),
                f"{bank.epsilon_recorded:.4f} <span class=muted>({_esc(bank.accountant.upper())})</span>",
                f"{bank.epsilon_pld:.4f}",
                f'<span class="muted">{rdp}</span>' if rdp_is_bound else rdp,
                f"{bank.budget:g}" + ("" if bank.budget_source == "policy" else "*"),
                f'<span class="{css}">{_esc(remaining)}</span>',
                _status(bank.ok),
            ]
        )
    for bank in _missing_ledgers(result):
        rows.append([_esc(bank), '<span class="bad">ledger missing: only the server\'s mirror was given</span>',
                     *["n/a"] * 6, _status(False)])  # fmt: skip
    headers = ["bank", "rounds trained", "refused / skipped / dropped", "ε spent (bank's accountant)",
               "ε recomputed (PLD)", "ε RDP (upper bound)", "budget ε", "budget left", "checks"]  # fmt: skip
    return (
        "<h2>Banks</h2>"
        + _table(headers, rows, numeric=(3, 4, 5, 6, 7), names=(0,))
        + "<p class=small>Budget ε: the bank's lifetime ε by its policy file (<code>--policy</code>, tightened "
        "by the node-config its entries record); * without it, the largest budget its ledger records (its "
        "policy's is at least that). Budget left = budget − the larger of ε spent and ε recomputed (PLD); "
        "below 0 it is an overspend only for a job that spent: a bank that refused spent nothing. "
        "† RDP is a looser upper bound shown for comparison only: these banks enforce their budget with PRV "
        "(checked here with PLD), so an RDP value above the budget is <em>not</em> an overspend. "
        "“n/a — chain broken”: the ledger could not be verified past a broken line, so no budget left is "
        "shown.</p>" + _html_bank_config(result)
    )


def _cell(value: Any, digits: str) -> str:
    return "—" if value is None else f"{value:{digits}}"


def _html_rounds(bank: BankSummary, result: AuditResult) -> str:
    rows = []
    for point, entry in _with_entries(bank):
        status_css = {"trained": "", "refused": "info", "non-private": "bad", "failed": "warn"}.get(
            point.status, "muted"
        )
        reason = str(entry.get("reason") or "")
        rows.append(
            [
                str(point.round),
                f'<span class="{status_css}">{_esc(point.status)}</span>',
                _cell(point.noise_multiplier, ".4g"),
                _cell(point.sample_rate, ".4g"),
                _cell(point.steps, "d"),
                _cell(entry.get("expected_batch_size") if point.status == "trained" else None, "d"),
                f"{point.epsilon:.4f}",
                f"{point.epsilon_pld:.4f}",
                _esc(_round_left(bank, point, result)),
                _esc(point.source.rpartition(":")[2]),
                f"<span class='small muted'>{_esc(reason[:160])}</span>",
            ]
        )
    broken = broken_chains(bank, result)
    note = "".join(
        f"<p class=bad>Chain of <code class=path>{_esc(_absolute(f.path))}</code> broken at line "
        f"{f.chain.first_bad_line}: only the {f.chain.n_entries} entries before it are shown, and no budget "
        "left can be trusted.</p>"
        for f in broken
    )
    headers = ["round", "status", "σ", "q", "steps", "expected batch", f"ε after round ({bank.accountant.upper()})",
               "ε recomputed (PLD)", "budget left", "ledger line", "reason"]  # fmt: skip
    return (
        f"<h3>{_esc(_label(bank, result))} <span class='small muted'>— "
        f"<code class=path>{_esc(_absolute(bank.authority))}</code></span></h3>"
        + note
        + _table(headers, rows, numeric=(0, 2, 3, 4, 5, 6, 7, 8, 9))
    )


def _html_flags(flags: list[Flag]) -> str:
    if not flags:
        return "<h2>Flags and what to do</h2><p>None: no check failed and nothing needs attention.</p>"
    css = {"error": "bad", "warning": "warn", "info": "info"}
    rows = [
        [
            f'<span class="{css.get(f.severity, "")}">{_esc(f.severity)}</span>',
            f"<code class=check>{_esc(f.check)}</code>",
            _esc(f.bank or "-"),
            _esc("-" if f.round is None else str(f.round)),
            f"<code class=path>{_esc(f.location)}</code>",
            _esc(f.message),
            _esc(f.what_to_do),
        ]
        for f in flags
    ]
    return "<h2>Flags and what to do</h2>" + _table(
        ["severity", "check", "bank", "round", "where (file:line)", "what happened", "what to do"], rows, names=(2,)
    )


def _html_empirical(result: AuditResult) -> str:
    head = "<h2>Empirical audit (one-run canaries; Steinke, Nasr &amp; Jagielski 2023)</h2>"
    if not result.empirical:
        return head + (
            "<p><strong>Not run.</strong> This audit checked the ledgers only. The empirical audit "
            "(<code>python -m fedmoe.audit --empirical</code>) runs the DP-SGD code on a tiny model with planted "
            "canaries and tries to detect them; it tests the code, not this job's configuration.</p>"
        )
    parts = [head]
    for e in result.empirical:
        verdict_css = {"PASS": "ok", "FAIL": "bad"}.get(e.verdict, "warn")
        parts.append(
            f'<p>Verdict: <span class="{verdict_css}">{_esc(e.verdict)}</span>. '
            f"<strong>What it tested is not this job's configuration:</strong> one private round of DP-SGD on the "
            f"<em>tiny</em> model (whole model trained, SGD) over synthetic data with m = {e.canaries} canaries "
            f"({e.in_canaries} inserted, n = {e.n_samples}), at the claimed ε = {e.claimed_epsilon:.3f}, "
            f"δ = {e.delta:g}, σ = {e.noise_multiplier:.4g}, q = {e.sample_rate:.4g}, {e.steps} steps"
            f"{' — with the noise switched off on purpose (fault injection)' if e.fault_injected else ''}. "
            f"It checks that clipping, noise, sampling and accounting in the code leak no more than claimed; "
            f"it says nothing directly about the banks' ε above.</p>"
            + _table(
                ["ε lower bound (95%)", "ε claimed", "largest ε it can certify", "correct / guesses", "verdict"],
                [
                    [
                        f"{e.epsilon_lower_bound:.3f}",
                        f"{e.claimed_epsilon:.3f}",
                        f"{e.max_certifiable_epsilon:.2f}",
                        f"{e.correct} / {e.guesses}",
                        f'<span class="{verdict_css}">{_esc(e.verdict)}</span>',
                    ]
                ],  # fmt: skip
                numeric=(0, 1, 2),
            )
            + "<p class=small>A lower bound above the claim fails. A pass also needs the same audit to have "
            "caught a positive control (a mechanism whose true ε is twice the claim); otherwise the result is "
            "“INCONCLUSIVE”, never a pass. With m canaries even a perfect attack cannot show ε above the "
            "certifiable maximum.</p>"
        )
    return "".join(parts)


def _html_definitions() -> str:
    items = "".join(f"<dt>{_esc(term)}</dt><dd>{_esc(text)}</dd>" for term, text in DEFINITIONS)
    return f"<h2>How to read this report</h2><dl class=defs>{items}</dl>"


def _html_plots(result: AuditResult) -> str:
    if not result.banks:
        return ""
    parts = [
        "<h2>Privacy spent</h2><figure>"
        f'<img src="{_epsilon_figure(result)}" alt="epsilon spent per bank after each round, against its budget">'
        "<figcaption>ε after each round by the bank's own accountant (the recomputed PLD values are in the tables "
        "below, within 1%). Banks with identical curves share one line named after all of them; otherwise curves "
        "are shifted slightly sideways so none hides another. The y axis starts at 0.</figcaption></figure>"
    ]
    noise = _noise_figure(result)
    if noise is None:
        parts.append(
            "<p class=small>No noise plot: σ and q were the same in every trained round of each bank (see "
            "“Configuration per bank”).</p>"
        )
    else:
        parts.append(f'<figure><img src="{noise}" alt="noise multiplier and sample rate per round"></figure>')
    return "".join(parts)


def _html_integrity(result: AuditResult) -> str:
    rows = [
        [
            f"<code class=path>{_esc(_absolute(f.path))}</code>",
            _esc(f.kind),
            _esc(", ".join(f.bank_ids) or "-"),
            str(f.chain.n_entries),
            _status(True) if f.chain.ok else f'<span class="bad">broken at line {f.chain.first_bad_line}</span>',
            f"<code class=hash>{_esc(f.chain.last_hash)}</code>",
        ]
        for f in result.files
    ]
    return (
        "<h2>Ledgers and hashes (what a sign-off pins)</h2>"
        + _table(["file", "kind", "bank", "entries verified", "chain", "head hash (last verified entry)"], rows, (3,))
        + f"<p class=small>This page's own SHA-256 cannot be written inside it: it is in <code>{SHA256_FILE}</code> "
        f"next to this file (check with <code>sha256sum -c {SHA256_FILE}</code>), printed on the console, in "
        f"<code>{FINDINGS_FILE}</code>, and in <code>signoff.json</code> once a privacy officer signs off.</p>"
    )


def render_html(result: AuditResult, flags: list[Flag], verdict: Verdict, generated: str) -> str:
    """The whole self-contained page (no external file, script or font)."""
    rounds = "".join(_html_rounds(b, result) for b in result.banks)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedmoe privacy audit — {verdict.headline}</title>
<style>{_STYLE}</style></head><body>
<h1>fedmoe privacy audit</h1>
<p class=muted>Hash chains of every ledger verified; every ε recomputed from the recorded σ, q and steps with
dp_accounting (PLD, and RDP), independently of the values the banks wrote (tolerance 1%, +0.01 for PRV).</p>
{_html_verdict(verdict)}
{_html_job(result, generated)}
{_html_definitions()}
{_html_bank_summary(result)}
{_html_plots(result)}
<h2>Every round, per bank</h2>{rounds or "<p>No bank ledger was given.</p>"}
{_html_flags(flags)}
{_html_empirical(result)}
{_html_integrity(result)}
</body></html>
"""


# ---------------------------------------------------------------------------------------------
# Files: report.html, findings.json, report.html.sha256
# ---------------------------------------------------------------------------------------------


def sha256_of(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _bank_json(bank: BankSummary, result: AuditResult) -> dict[str, Any]:
    remaining = remaining_text(bank, result, 6)
    return {
        "job_id": bank.job_id,
        "bank_id": bank.bank_id,
        "ledger": _absolute(bank.authority),
        "head_hash": bank.head_hash,
        "accountant": bank.accountant,
        "delta": bank.delta,
        "budget_epsilon": bank.budget,
        "budget_source": bank.budget_source,
        "epsilon_recorded": bank.epsilon_recorded,
        "epsilon_pld": bank.epsilon_pld,
        "epsilon_rdp_upper_bound": bank.epsilon_rdp,
        "remaining": None if remaining.startswith("n/a") else bank.remaining,
        "remaining_note": remaining if remaining.startswith("n/a") else "",
        "rounds": {
            "trained": bank.rounds_trained,
            "refused": bank.rounds_refused,
            "skipped": bank.rounds_skipped,
            "dropped": bank.rounds_dropped,
        },  # fmt: skip
        "ok": bank.ok,
    }


def _file_json(f: LedgerFile) -> dict[str, Any]:
    return {
        "path": _absolute(f.path),
        "kind": f.kind,
        "bank_ids": list(f.bank_ids),
        "job_ids": list(f.job_ids),
        "entries_verified": f.chain.n_entries,
        "chain_ok": f.chain.ok,
        "first_bad_line": f.chain.first_bad_line,
        "problem": f.chain.problem,
        "head_hash": f.chain.last_hash,
    }


def findings_document(
    result: AuditResult, flags: list[Flag], verdict: Verdict, *, generated: str, report_sha256: str
) -> dict[str, Any]:
    """findings.json: the verdict and every flag (with what to do), banks, files, empirical audit."""
    empirical: Any = "not run"
    if result.empirical:
        empirical = [
            {
                **e.to_dict(),
                "tested": "one DP-SGD round of the tiny model on synthetic data at its own epsilon, "
                "not the job's configuration",
            }  # fmt: skip
            for e in result.empirical
        ]
    return {
        "schema": FINDINGS_SCHEMA,
        "generated_at": generated,
        "verdict": "PASSED" if verdict.passed else "FAILED",
        "passed": verdict.passed,
        "reasons": list(verdict.reasons),
        "findings": [asdict(f) for f in flags],
        "banks": [_bank_json(b, result) for b in result.banks],
        "files": [_file_json(f) for f in result.files],
        "empirical": empirical,
        "report": {"file": REPORT_FILE, "sha256": report_sha256},
    }


@dataclass(frozen=True)
class ReportFiles:
    """What `write_report` wrote, and the report's SHA-256 (what a sign-off signs)."""

    html: Path
    findings: Path
    sha256_file: Path
    sha256: str
    passed: bool


def write_report(result: AuditResult, out_dir: str | os.PathLike[str]) -> ReportFiles:
    """Writes report.html (self-contained), findings.json and report.html.sha256 into `out_dir`.

    Args:
        result: from `audit_ledgers` (optionally `.with_empirical(...)`).
        out_dir: folder to write into (created).

    Returns:
        ReportFiles with the three paths and the report's SHA-256.
    """
    from fedmoe.protocol.files import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generated = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    flags = report_flags(result)
    verdict = audit_verdict(result, flags)
    page = render_html(result, flags, verdict, generated).encode("utf-8")
    digest = hashlib.sha256(page).hexdigest()
    html_path = atomic_write_bytes(out / REPORT_FILE, page)
    sha_path = atomic_write_bytes(out / SHA256_FILE, f"{digest}  {REPORT_FILE}\n".encode())
    document = findings_document(result, flags, verdict, generated=generated, report_sha256=digest)
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    findings_path = atomic_write_bytes(out / FINDINGS_FILE, text.encode("utf-8"))
    return ReportFiles(html_path, findings_path, sha_path, digest, verdict.passed)


def write_html_report(result: AuditResult, out_dir: str | os.PathLike[str]) -> Path:
    """`write_report`, returning only the path of report.html."""
    return write_report(result, out_dir).html
