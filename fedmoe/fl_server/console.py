"""The ServerApp's console: what an operator watching a job reads (the loop itself prints nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from fedmoe.fl_server.state import RoundRecord, ServerState

if TYPE_CHECKING:
    from fedmoe.fl_server.federation import Federation


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

    def answered(self, what: str, bank: str, pending: list[str], seconds: float) -> None:
        """While an exchange is open: who answered; only once it is slow enough to wonder (training)."""
        if seconds >= PROGRESS_AFTER_SECONDS:
            waiting = f"waiting for {_names(pending)}" if pending else "all answered"
            self.console.print(f"  {what}: {bank} answered after {seconds:.1f}s; {waiting}")

    def round_done(self, record: RoundRecord, state: ServerState) -> None:
        # The banks evaluate the last aggregate when they apply it: at the start of this round.
        before = record.round - 1
        records = [r.eval_loss for r in state.rounds if r.round == before]
        losses = state.eval_round0 if before == 0 else (records[0] if records else {})
        self.console.print(
            f"round {record.round}: {len(record.participants)} bank(s) aggregated"
            f"{'' if record.aggregated else ' [red](no aggregate)[/]'}; {record.seconds.get('round', 0):.1f}s; "
            f"eval loss of the model after round {before}: {_loss_text(losses)}"
        )
        for who, why in sorted(record.left_out.items()):
            self.console.print(f"  [yellow]left out[/] {who}: {why}")
        for quarantined in record.quarantined:
            self.console.print(f"  [red]quarantined[/] the aggregate of round {quarantined}: banks rejected it")
        for bank, finding in record.named.items():
            self.console.print(f"  [red]excluded[/] {bank}: {finding}")
        if record.no_aggregate:
            self.console.print(f"  [red]no aggregate[/]: {record.no_aggregate}")

    def job_done(self, federation: Federation) -> None:
        self.console.print(summary_table(federation.job.job_id, federation.state))


PROGRESS_AFTER_SECONDS = 5.0
PER_BANK_COLUMNS = 6  # beyond this many banks, tables and lines summarise (mean/min/max, worst named)


def _names(banks: list[str]) -> str:
    return ", ".join(banks) if len(banks) <= PER_BANK_COLUMNS else f"{len(banks)} banks ({', '.join(banks[:3])}, ...)"


def _loss_text(losses: dict[str, float]) -> str:
    if not losses:
        return "-"
    if len(losses) <= PER_BANK_COLUMNS:
        return ", ".join(f"{b}={v:.3f}" for b, v in sorted(losses.items()))
    mean, low, high, worst = _summary_cells(losses)
    return f"mean {mean}, min {low}, max {high} ({worst}) over {len(losses)} banks"


def _timing(r: RoundRecord) -> list[str]:
    metrics = r.train_metrics.values()
    train_s = max((m.get("seconds-train", 0.0) for m in metrics), default=0.0)
    enc_s = max((m.get("seconds-encrypt", 0.0) for m in metrics), default=0.0)
    transport = r.seconds.get("round-trip", 0.0) - train_s - enc_s
    if "secagg-masked_input" not in r.seconds:  # CKKS adds the ciphertexts after the round trip
        transport += r.seconds.get("aggregate", 0.0)
    return [str(len(r.participants)), f"{train_s:.1f}", f"{enc_s:.1f}", f"{transport:.1f}"]


def summary_table(job_id: str, state: ServerState) -> Table:
    """Eval loss per bank and round; with more than PER_BANK_COLUMNS banks, mean/min/max + the worst."""
    banks = sorted({b for r in state.rounds for b in (*r.eval_loss, *r.train_metrics)} | set(state.eval_round0))
    per_bank = len(banks) <= PER_BANK_COLUMNS
    table = Table(title=f"fedmoe job {job_id}: eval loss per bank (round 0 = before training)")
    table.add_column("round", justify="right")
    for title in banks if per_bank else ("mean", "min", "max", "worst bank"):
        table.add_column(title, justify="right")
    for title in ("banks", "train s (max)", "encrypt s (max)", "transport+agg s"):
        table.add_column(title, justify="right")
    rows = [("0", state.eval_round0, ["", "", "", ""])]
    rows += [(str(r.round), r.eval_loss, _timing(r)) for r in state.rounds]
    for label, losses, timing in rows:
        table.add_row(label, *(_loss_cells(losses, banks) if per_bank else _summary_cells(losses)), *timing)
    return table


def _loss_cells(losses: dict[str, float], banks: list[str]) -> list[str]:
    return [f"{losses[b]:.3f}" if b in losses else "-" for b in banks]


def _summary_cells(losses: dict[str, float]) -> list[str]:
    if not losses:
        return ["-", "-", "-", "-"]
    worst = max(losses, key=losses.__getitem__)
    values = losses.values()
    return [f"{sum(values) / len(losses):.3f}", f"{min(values):.3f}", f"{losses[worst]:.3f}", worst]


class SilentReporter:
    """For tests and library use: the loop's events go nowhere."""

    def note(self, text: str) -> None:
        pass

    def job_started(self, federation: Federation, n_banks: int) -> None:
        pass

    def answered(self, what: str, bank: str, pending: list[str], seconds: float) -> None:
        pass

    def round_done(self, record: RoundRecord, state: ServerState) -> None:
        pass

    def job_done(self, federation: Federation) -> None:
        pass
