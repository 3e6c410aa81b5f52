"""The federated job loop over a Flower Grid: plain logic, called by the ServerApp shell.

Per round: pick the connected banks -> send each a train request with the encrypted aggregates
it has not applied yet -> collect ciphertext bundles and plain metrics -> validate and add them
with `crypto` (public context only) -> store the encrypted sum -> ask the banks to evaluate.
Banks that fail, time out, refuse or send invalid ciphertexts are left out of the round with the
reason recorded; the round counts when at least `min-banks` contributions were valid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message, MessageType
from flwr.serverapp import Grid
from rich.console import Console
from rich.table import Table

from crypto import ExpectedHeader, aggregate, load_public_context
from crypto.keys import PUBLIC_FILE
from fl_client.bank import trainable_layout
from fl_client.config import JobConfig
from fl_client.ledger import Ledger, LedgerError, bank_exhausted, check_bank_entry, mirror_entry, mirror_path
from fl_client.messages import TRAIN_STATUS_OK, EvalReply, RoundRequest, TrainReply
from fl_server.state import RoundRecord, ServerState, ServerStore

logger = logging.getLogger(__name__)


@dataclass
class Federation:
    grid: Grid
    job: JobConfig
    console: Console

    def __post_init__(self) -> None:
        self.store = ServerStore(self.job)
        self.state = self.store.load_or_init()
        # The public context only: it can add ciphertexts and cannot decrypt (load refuses a secret one).
        self.key = load_public_context(f"{self.job.key_dir}/{PUBLIC_FILE}")
        # The server builds the job's model itself: the layout every bundle must carry and the
        # start values every bank must report (not "whichever bank answers first").
        self.layout_hash, self.n_elements, self.start_hash = trainable_layout(self.job)
        self.node_bank: dict[int, str] = {int(k): v for k, v in self.state.node_bank.items()}
        self.reply_node: dict[int, int] = {}  # id(reply) -> node it came from (set by send)

    def save(self) -> None:
        self.state.node_bank = {str(node): bank for node, bank in self.node_bank.items()}
        self.store.save(self.state)

    # ---- messaging ------------------------------------------------------------------------------
    def wait_for_banks(self) -> list[int]:
        deadline = time.monotonic() + self.job.round_timeout
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < self.job.min_banks and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        return nodes

    def request(self, node_id: int, round_idx: int) -> RoundRequest:
        bank = self.node_bank.get(node_id)
        applied = self.state.applied.get(bank, 0) if bank else 0
        return RoundRequest(
            job_id=self.job.job_id,
            round=round_idx,
            key_id=self.key.key_id,
            key_epoch=self.key.epoch,
            aggregates=self.store.aggregates_after(self.state, applied),
        )

    def send(self, nodes: Iterable[int], round_idx: int, message_type: str) -> tuple[list[Message], set[int]]:
        messages = [
            Message(
                content=self.request(node, round_idx).to_content(),
                message_type=message_type,
                dst_node_id=node,
                group_id=f"{self.job.job_id}-r{round_idx}",
            )
            for node in nodes
        ]
        replies = list(self.grid.send_and_receive(messages, timeout=self.job.round_timeout))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set by the push
        # Error replies made by the SuperLink (e.g. "node unavailable") come from the SuperLink,
        # not the bank: find the bank's node through the message they answer.
        self.reply_node = {id(r): node_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies}
        answered = set(self.reply_node.values())
        return replies, set(node_of.values()) - answered

    # ---- rounds ---------------------------------------------------------------------------------
    def evaluate(self, nodes: list[int], round_idx: int) -> dict[str, float]:
        replies, silent = self.send(nodes, round_idx, MessageType.EVALUATE)
        losses: dict[str, float] = {}
        for reply in replies:
            node = self.reply_node[id(reply)]
            if reply.has_error():
                logger.warning("evaluate round %d: node %s failed: %s", round_idx, node, reply.error.reason)
                continue
            ev = EvalReply.from_content(reply.content)
            self.node_bank[node] = ev.bank_id
            self.state.applied[ev.bank_id] = ev.applied_round
            losses[ev.bank_id] = ev.eval_loss
        for node in silent:
            logger.warning("evaluate round %d: node %s did not answer", round_idx, node)
        return losses

    def train_round(self, round_idx: int, nodes: list[int]) -> RoundRecord:
        record = RoundRecord(round=round_idx)
        selected = []
        for node in nodes:  # the server stops selecting banks whose budget is spent
            bank = self.node_bank.get(node)
            if bank in self.state.exhausted:
                record.left_out[bank] = f"not selected: {self.state.exhausted[bank]}"
            else:
                selected.append(node)
        nodes = selected
        started = time.perf_counter()
        replies, silent = self.send(nodes, round_idx, MessageType.TRAIN)
        record.seconds["round-trip"] = time.perf_counter() - started
        for node in silent:
            record.left_out[self.node_bank.get(node, f"node-{node}")] = "no reply within round-timeout"
        bundles: list[tuple[str, bytes]] = []
        ledger_entries: dict[str, dict] = {}
        for reply in replies:
            node = self.reply_node[id(reply)]
            if reply.has_error():
                record.left_out[self.node_bank.get(node, f"node-{node}")] = f"client error: {reply.error.reason}"
                continue
            tr = TrainReply.from_content(reply.content)
            self.node_bank[node] = tr.bank_id
            self.state.applied[tr.bank_id] = tr.applied_round
            if tr.status != TRAIN_STATUS_OK:
                record.left_out[tr.bank_id] = f"{tr.status}: {tr.reason}"
                self.state.exhausted[tr.bank_id] = f"refused round {round_idx}: {tr.reason}"
                continue
            if self.job.dp:
                try:  # the bank's hash-chained ledger entry for this round, mirrored below
                    entry = check_bank_entry(
                        tr.ledger_entry, bank_id=tr.bank_id, round=round_idx, job_id=self.job.job_id
                    )
                except LedgerError as err:
                    record.left_out[tr.bank_id] = f"invalid ledger entry: {err}"
                    continue
                ledger_entries[tr.bank_id] = entry
                if bank_exhausted(entry):
                    self.state.exhausted[tr.bank_id] = (
                        f"budget exhausted after round {round_idx}: next round would reach "
                        f"ε={entry['epsilon_next_round']:.3f} > {entry['budget_epsilon']:g}"
                    )
            self.state.start_hash = self.start_hash
            if tr.start_hash != self.start_hash:
                record.left_out[tr.bank_id] = (
                    f"start model differs: hash {tr.start_hash[:12]}, the job's model is {self.start_hash[:12]}"
                )
                continue
            bundles.append((tr.bank_id, tr.bundle))  # pairs: crypto rejects a second one per bank
            record.train_metrics.setdefault(tr.bank_id, tr.metrics)

        t_agg = time.perf_counter()
        expected = ExpectedHeader(
            key_id=self.key.key_id,
            epoch=self.key.epoch,
            round=round_idx,
            layout_hash=self.layout_hash,
            n_elements=self.n_elements,
        )
        result = aggregate(bundles, key=self.key, expected=expected)
        record.seconds["aggregate"] = time.perf_counter() - t_agg
        for rejected in result.rejected:
            label = rejected.bank_id if rejected.bank_id not in result.accepted else f"{rejected.bank_id} (2nd)"
            record.left_out[label] = f"invalid ciphertext ({rejected.reason}): {rejected.message}"
            if rejected.bank_id not in result.accepted:
                record.train_metrics.pop(rejected.bank_id, None)
        record.participants = sorted(result.accepted)
        for label in self.state.seen:  # banks (or unnamed nodes) of earlier rounds that are gone now
            if label not in record.participants and label not in record.left_out:
                record.left_out[label] = "not connected"
        self.state.seen = sorted({*self.state.seen, *record.participants, *record.left_out} - {"(round)"})
        if len(result.accepted) >= self.job.min_banks and result.bundle is not None:
            self.store.save_aggregate(round_idx, result.bundle)
            record.aggregated = True
        else:
            record.left_out["(round)"] = (
                f"only {len(result.accepted)} valid contribution(s), min-banks is {self.job.min_banks}: no aggregate"
            )
        if self.job.dp:
            self.mirror_ledgers(record, ledger_entries)
        return record

    def mirror_ledgers(self, record: RoundRecord, entries: dict[str, dict]) -> None:
        """Appends this round to the server's per-bank ledger mirrors (the bank entries verbatim)."""
        mirror_dir = self.store.root / "ledger-mirror"
        outcomes = {bank: ("received", "") for bank in record.participants}
        for label, why in record.left_out.items():
            if label == "(round)" or " " in label:  # "(round)" and a bank's 2nd contribution
                continue
            skipped = why.startswith(("not selected", "not connected"))
            outcomes[label] = ("skipped" if skipped else "dropped", why)
        for bank, (status, why) in sorted(outcomes.items()):
            mirror = Ledger(mirror_path(mirror_dir, bank))
            mirror.append(
                mirror_entry(
                    job_id=self.job.job_id,
                    bank_id=bank,
                    round=record.round,
                    server_status=status,
                    bank_entry=entries.get(bank),
                    reason=why,
                )
            )

    def run(self) -> ServerState:
        state = self.state
        if state.finished:
            self.console.print(f"job {self.job.job_id!r} already finished ({state.end_reason}); nothing to do")
            return state
        if state.completed_round:
            self.console.print(f"resuming job {self.job.job_id!r} after round {state.completed_round}")
        nodes = self.wait_for_banks()
        self.console.print(
            f"[bold]job {self.job.job_id}[/]: {len(nodes)} bank(s) connected, "
            f"{self.job.num_rounds} rounds, key {self.key.key_id[:12]} epoch {self.key.epoch}"
        )
        if self.job.evaluate and state.completed_round == 0 and not state.eval_round0:
            state.eval_round0 = self.evaluate(nodes, 0)
            self.save()
        for round_idx in range(state.completed_round + 1, self.job.num_rounds + 1):
            nodes = self.wait_for_banks()
            if len(nodes) < self.job.min_banks:
                state.end_reason = (
                    f"only {len(nodes)} bank(s) connected before round {round_idx}, min-banks {self.job.min_banks}"
                )
                # Not finished: a later run of the same job resumes once enough banks are back.
                self.save()
                self.console.print(f"[red]stopped[/]: {state.end_reason}; resubmit the job to resume")
                return state
            selectable = [n for n in nodes if self.node_bank.get(n) not in state.exhausted]
            if len(selectable) < self.job.min_banks:
                state.end_reason = (
                    f"job ended before round {round_idx}: {len(selectable)} bank(s) with privacy budget left, "
                    f"min-banks {self.job.min_banks} (exhausted: {', '.join(sorted(state.exhausted))})"
                )
                break
            started = time.perf_counter()
            record = self.train_round(round_idx, nodes)
            state.rounds.append(record)  # before evaluating: its aggregate goes out with the request
            state.completed_round = round_idx
            # Saved before the aggregate reaches any bank (evaluate): a restart resumes after this
            # round and never re-runs a round some banks have already applied.
            self.save()
            if self.job.evaluate and record.aggregated:
                record.eval_loss = self.evaluate(nodes, round_idx)
            record.seconds["round"] = time.perf_counter() - started
            self.save()
            self.print_round(record)
        else:
            state.end_reason = f"completed {self.job.num_rounds} rounds"
        state.finished = True
        self.save()
        path = self.store.write_results(state, {"layout-hash": self.layout_hash, "n-elements": self.n_elements})
        self.print_summary()
        self.console.print(f"results: {path}")
        return state

    # ---- console ---------------------------------------------------------------------------------
    def print_round(self, record: RoundRecord) -> None:
        losses = ", ".join(f"{b}={v:.3f}" for b, v in sorted(record.eval_loss.items()))
        self.console.print(
            f"round {record.round}: {len(record.participants)} bank(s) aggregated"
            f"{'' if record.aggregated else ' [red](no aggregate)[/]'}; eval loss {losses or '-'}; "
            f"{record.seconds.get('round', 0):.1f}s"
        )
        for who, why in sorted(record.left_out.items()):
            self.console.print(f"  [yellow]left out[/] {who}: {why}")

    def print_summary(self) -> None:
        state = self.state
        banks = sorted({b for r in state.rounds for b in (*r.eval_loss, *r.train_metrics)} | set(state.eval_round0))
        table = Table(title=f"fedmoe job {self.job.job_id}: eval loss per bank (round 0 = before training)")
        table.add_column("round", justify="right")
        for bank in banks:
            table.add_column(bank, justify="right")
        table.add_column("train s (max)", justify="right")
        table.add_column("encrypt s (max)", justify="right")
        table.add_column("transport+agg s", justify="right")
        table.add_column("ε spent (max)", justify="right")
        table.add_row("0", *[f"{state.eval_round0.get(b, float('nan')):.3f}" for b in banks], "", "", "", "")
        for r in state.rounds:
            train_s = max((m.get("seconds-train", 0.0) for m in r.train_metrics.values()), default=0.0)
            enc_s = max((m.get("seconds-encrypt", 0.0) for m in r.train_metrics.values()), default=0.0)
            eps = max((m.get("epsilon-total", 0.0) for m in r.train_metrics.values()), default=0.0)
            transport = r.seconds.get("round-trip", 0.0) - train_s - enc_s + r.seconds.get("aggregate", 0.0)
            table.add_row(
                str(r.round),
                *[f"{r.eval_loss[b]:.3f}" if b in r.eval_loss else "-" for b in banks],
                f"{train_s:.1f}",
                f"{enc_s:.1f}",
                f"{transport:.1f}",
                f"{eps:.2f}",
            )
        self.console.print(table)
