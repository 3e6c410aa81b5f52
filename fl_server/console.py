"""The ServerApp's console: what an operator watching a job reads (the loop itself prints nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from fl_server.state import RoundRecord, ServerState

if TYPE_CHECKING:
    from fl_server.federation import Federation


class ConsoleReporter:
    def __init__(self, console: Console) -> None:
        self.console = console

    def note(self, text: str) -> None:
        self.console.print(text)

    def job_started(self, federation: Federation, n_banks: int) -> None:
        job = federation.job
        self.console.print(
            f"[bold]job {job.job_id}[/]: {n_banks} bank(s) connected, {job.num_rounds} rounds, "
            f"{job.aggregation} key {federation.key_id[:12]} epoch {federation.key_epoch}"
        )

    def round_done(self, record: RoundRecord) -> None:
        losses = ", ".join(f"{b}={v:.3f}" for b, v in sorted(record.eval_loss.items()))
        self.console.print(
            f"round {record.round}: {len(record.participants)} bank(s) aggregated"
            f"{'' if record.aggregated else ' [red](no aggregate)[/]'}; eval loss {losses or '-'}; "
            f"{record.seconds.get('round', 0):.1f}s"
        )
        for who, why in sorted(record.left_out.items()):
            self.console.print(f"  [yellow]left out[/] {who}: {why}")
        for quarantined in record.quarantined:
            self.console.print(f"  [red]quarantined[/] the aggregate of round {quarantined}: banks rejected it")
        if record.no_aggregate:
            self.console.print(f"  [red]no aggregate[/]: {record.no_aggregate}")

    def job_done(self, federation: Federation) -> None:
        self.console.print(summary_table(federation.job.job_id, federation.state))


def summary_table(job_id: str, state: ServerState) -> Table:
    banks = sorted({b for r in state.rounds for b in (*r.eval_loss, *r.train_metrics)} | set(state.eval_round0))
    table = Table(title=f"fedmoe job {job_id}: eval loss per bank (round 0 = before training)")
    table.add_column("round", justify="right")
    for bank in banks:
        table.add_column(bank, justify="right")
    for title in ("banks", "train s (max)", "encrypt s (max)", "transport+agg s"):
        table.add_column(title, justify="right")
    table.add_row("0", *[f"{state.eval_round0.get(b, float('nan')):.3f}" for b in banks], "", "", "", "")
    for r in state.rounds:
        metrics = r.train_metrics.values()
        train_s = max((m.get("seconds-train", 0.0) for m in metrics), default=0.0)
        enc_s = max((m.get("seconds-encrypt", 0.0) for m in metrics), default=0.0)
        transport = r.seconds.get("round-trip", 0.0) - train_s - enc_s + r.seconds.get("aggregate", 0.0)
        table.add_row(
            str(r.round),
            *[f"{r.eval_loss[b]:.3f}" if b in r.eval_loss else "-" for b in banks],
            str(len(r.participants)),
            f"{train_s:.1f}",
            f"{enc_s:.1f}",
            f"{transport:.1f}",
        )
    return table


class SilentReporter:
    """For tests and library use: the loop's events go nowhere."""

    def note(self, text: str) -> None:
        pass

    def job_started(self, federation: Federation, n_banks: int) -> None:
        pass

    def round_done(self, record: RoundRecord) -> None:
        pass

    def job_done(self, federation: Federation) -> None:
        pass
