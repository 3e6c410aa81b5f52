"""Showing an AuditResult: a rich table for the console, an HTML report with PNG plots.

    <out>/report.html   verdict, files and chains, one row per bank, every finding, the
                        empirical (canary) audit if one ran, and the two plots:
    <out>/epsilon.png   epsilon vs round per bank (recorded, and PLD recomputed) against its
                        budget line
    <out>/noise.png     noise multiplier and sample rate per trained round, per bank
matplotlib is used through its object API (Figure, no pyplot: no global backend switch) and
imported only when a report is written.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from audit.verify import AuditResult, BankSummary

REPORT_FILE = "report.html"
EPSILON_PLOT = "epsilon.png"
NOISE_PLOT = "noise.png"


def _rounds(rounds: tuple[int, ...]) -> str:
    return ", ".join(map(str, rounds)) if rounds else "-"


def _label(bank: BankSummary, result: AuditResult) -> str:
    jobs = {b.job_id for b in result.banks}
    return bank.bank_id if len(jobs) <= 1 else f"{bank.bank_id} ({bank.job_id})"


def _counts(result: AuditResult) -> str:
    failed = sum(not e.passed for e in result.empirical)
    text = f"{len(result.errors)} error(s), {len(result.warnings)} warning(s)"
    return text + (f", {failed} empirical audit(s) failed" if failed else "")


def render_table(result: AuditResult, console: Console) -> None:
    """Prints the per-bank table, the findings and the empirical audit to `console`."""
    table = Table(title="privacy ledger audit: epsilon per bank", title_justify="left")
    for name, justify in (
        ("bank", "left"),
        ("acct", "left"),
        ("δ", "right"),
        ("rounds joined", "left"),
        ("refused/skipped/dropped", "left"),
        ("ε spent", "right"),
        ("ε PLD", "right"),
        ("ε RDP", "right"),
        ("budget", "right"),
        ("remaining", "right"),
        ("checks", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name in ("bank", "δ"))
    table.caption = "ε spent: the bank's accountant, as recorded; ε PLD / RDP: recomputed here from the histories"
    for bank in result.banks:
        other = " / ".join(_rounds(r) for r in (bank.rounds_refused, bank.rounds_skipped, bank.rounds_dropped))
        table.add_row(
            _label(bank, result),
            bank.accountant,
            f"{bank.delta:g}",
            _rounds(bank.rounds_trained),
            other,
            f"{bank.epsilon_recorded:.3f}",
            f"{bank.epsilon_pld:.3f}",
            f"{bank.epsilon_rdp:.3f}",
            f"{bank.budget:g}",
            f"[{'red' if bank.remaining < 0 else 'green'}]{bank.remaining:.3f}[/]",
            "[green]ok[/]" if bank.ok else "[red]FAIL[/]",
        )
    console.print(table)
    files = Table(title="ledger files", title_justify="left")
    for name in ("file", "kind", "entries", "chain"):
        files.add_column(name)
    for f in result.files:
        chain = "[green]ok[/]" if f.chain.ok else f"[red]broken at line {f.chain.first_bad_line}[/]"
        files.add_row(escape(str(f.path)), f.kind, str(f.chain.n_entries), chain)
    console.print(files)
    # Findings as whole lines (file:line never broken across rows: easy to grep and click).
    for f in result.findings:
        color = "red" if f.severity == "error" else "yellow"
        console.print(
            f"[{color}]{f.severity}[/] {escape(f.location)}: \\[{escape(f.check)}] {escape(f.message)}", soft_wrap=True
        )
    for emp in result.empirical:
        color = "green" if emp.passed else "red"
        console.print(f"[bold]empirical audit[/] [{color}]{escape(emp.summary())}[/]", soft_wrap=True)
    verdict = "[bold green]AUDIT PASSED[/]" if result.ok else "[bold red]AUDIT FAILED[/]"
    console.print(f"{verdict}: {_counts(result)}")


def _plot_epsilon(result: AuditResult, path: Path) -> None:
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), dpi=110)  # no pyplot: no global backend or figure registry
    ax = fig.subplots()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, bank in enumerate(result.banks):
        color = colors[i % len(colors)]
        rounds = [p.round for p in bank.points]
        ax.plot(rounds, [p.epsilon for p in bank.points], "o-", color=color, label=f"{_label(bank, result)} recorded")
        ax.plot(rounds, [p.epsilon_pld for p in bank.points], "x:", color=color, alpha=0.7, label="  PLD recomputed")
        refused = [p for p in bank.points if p.status != "trained"]
        if refused:
            ax.plot([p.round for p in refused], [p.epsilon for p in refused], "s", mfc="none", color=color, ms=9)
        ax.axhline(bank.budget, color=color, ls="--", lw=1, label=f"  budget {bank.budget:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("ε (at the bank's δ)")
    ax.set_title("privacy spent per bank (open squares: refused / skipped / dropped rounds)")
    ax.grid(alpha=0.3)
    if result.banks:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)


def _plot_noise(result: AuditResult, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5.5), dpi=110)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for bank in result.banks:
        trained = [p for p in bank.points if p.status == "trained"]
        rounds = [p.round for p in trained]
        top.plot(rounds, [p.noise_multiplier for p in trained], "o-", label=_label(bank, result))
        bottom.plot(rounds, [p.sample_rate for p in trained], "o-", label=_label(bank, result))
    top.set_ylabel("noise multiplier σ")
    bottom.set_ylabel("sample rate q")
    bottom.set_xlabel("round")
    top.set_title("DP-SGD mechanism per trained round")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if result.banks:
        top.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.ok { color: #1a7f37; font-weight: bold; } .fail { color: #cf222e; font-weight: bold; }
.warn { color: #9a6700; } img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
code { font-size: 0.9em; }
"""


def write_html_report(result: AuditResult, out_dir: str | os.PathLike[str]) -> Path:
    """Writes report.html with epsilon.png and noise.png beside it.

    Args:
        result: from `audit_ledgers` (optionally `.with_empirical(...)`).
        out_dir: folder to write into (created).

    Returns:
        The path of report.html.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot_epsilon(result, out / EPSILON_PLOT)
    _plot_noise(result, out / NOISE_PLOT)
    esc = html.escape

    def verdict(ok: bool) -> str:
        return '<span class="ok">ok</span>' if ok else '<span class="fail">FAIL</span>'

    bank_rows = [
        [
            esc(_label(b, result)),
            esc(b.accountant),
            f"{b.delta:g}",
            esc(_rounds(b.rounds_trained)),
            esc(" / ".join(_rounds(r) for r in (b.rounds_refused, b.rounds_skipped, b.rounds_dropped))),
            f"{b.epsilon_recorded:.4f}",
            f"{b.epsilon_pld:.4f}",
            f"{b.epsilon_rdp:.4f}",
            f"{b.budget:g}",
            f"{b.remaining:.4f}",
            verdict(b.ok),
            f"<code>{esc(b.authority)}</code>",
        ]
        for b in result.banks
    ]
    file_rows = [
        [
            f"<code>{esc(str(f.path))}</code>",
            esc(f.kind),
            str(f.chain.n_entries),
            verdict(True) if f.chain.ok else f'<span class="fail">broken at line {f.chain.first_bad_line}</span>',
        ]
        for f in result.files
    ]
    finding_rows = [
        [
            f'<span class="{"fail" if f.severity == "error" else "warn"}">{esc(f.severity)}</span>',
            f"<code>{esc(f.location)}</code>",
            esc(f.check),
            esc(f.message),
        ]
        for f in result.findings
    ]
    empirical = ""
    if result.empirical:
        rows = [
            [
                verdict(e.passed),
                f"{e.epsilon_lower_bound:.3f}",
                f"{e.claimed_epsilon:.3f}",
                f"{e.delta:g}",
                f"{e.confidence:.0%}",
                f"{e.canaries} ({e.in_canaries} in)",
                f"{e.k_plus} / {e.k_minus}",
                f"{e.correct} / {e.guesses}",
                f"{e.noise_multiplier:.4g}",
                f"{e.sample_rate:.4g}",
                str(e.steps),
                "yes" if e.fault_injected else "no",
            ]
            for e in result.empirical
        ]
        empirical = "<h2>Empirical audit (one-run canaries, Steinke, Nasr &amp; Jagielski 2023)</h2>" + _table(
            [
                "verdict",
                "ε lower bound",
                "ε claimed",
                "δ",
                "confidence",
                "canaries m",
                "k+ / k-",
                "correct / guesses",
                "σ",
                "q",
                "steps",
                "fault injected",
            ],
            rows,
        )
    verdict = "AUDIT PASSED" if result.ok else "AUDIT FAILED"
    overall = f'<p class="{"ok" if result.ok else "fail"}">{verdict}: {esc(_counts(result))}</p>'
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedmoe privacy ledger audit</title>
<style>{_STYLE}</style></head><body>
<h1>fedmoe privacy ledger audit</h1>
{overall}<p>Epsilon recomputed from the recorded histories with
dp_accounting (PLD, and RDP), independently of the values written; tolerance 1%
(+0.01 for PRV values).</p>
<h2>Banks</h2>
{
        _table(
            [
                "bank",
                "accountant",
                "δ",
                "rounds joined",
                "refused / skipped / dropped",
                "ε recorded",
                "ε PLD",
                "ε RDP",
                "budget",
                "remaining",
                "checks",
                "source",
            ],
            bank_rows,
        )
    }
<h2>Privacy spent</h2>
<img src="{EPSILON_PLOT}" alt="epsilon vs round per bank against its budget">
<img src="{NOISE_PLOT}" alt="noise multiplier and sample rate per round">
{empirical}
<h2>Ledger files</h2>
{_table(["file", "kind", "entries verified", "chain"], file_rows)}
<h2>Findings</h2>
{_table(["severity", "where", "check", "what"], finding_rows) if finding_rows else "<p>none</p>"}
</body></html>
"""
    path = out / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path
