"""The federated job loop over a Flower Grid: plain logic, called by the ServerApp shell.

A round is shaped like a Flower Strategy: select the banks once -> send each a train request
with the encrypted aggregates it has not applied yet -> collect one typed `BankOutcome` per
selected or known bank -> add the valid ciphertexts with `crypto` (public context only) ->
record the round (state, ledger mirror, metrics.csv). Banks report the loss of the model they
applied with their next reply; a closing message delivers the last aggregate. A bank that fails, times out,
refuses or sends an invalid reply is left out with its outcome and reason; the round counts when
at least `min-banks` contributions were valid. Printing is the reporter's job (fedmoe.fl_server.console).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedmoe.crypto import ExpectedHeader, aggregate, load_public_context
from fedmoe.crypto.keys import PUBLIC_FILE
from fedmoe.crypto.secagg.params import BANK_FLOOR
from fedmoe.fl_server.accountability import Accountability
from fedmoe.fl_server.layout import trainable_layout
from fedmoe.fl_server.outcomes import MIRROR_STATUS, BankOutcome, Outcome, Reporter
from fedmoe.fl_server.secagg_round import SecAggRound, load_secagg_keys
from fedmoe.fl_server.state import RoundRecord, ServerState, ServerStore
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.ledger import Ledger, LedgerError, check_commitment, mirror_entry, mirror_path
from fedmoe.protocol.messages import EvalReply, RoundRequest, SecAggStage, TrainReply, TrainStatus

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.1  # between pulls for replies while an exchange is open (10 cheap reads a second)
MAX_PULL_FAILURES = 50  # consecutive failed pulls (a SuperLink busy with many banks) before giving up
# A SuperNode that died after it took its message never answers, and the SuperLink makes no error
# reply for a message already delivered: the wait would last the whole round-timeout. While replies
# are awaited the server asks which nodes are online; one missing this long is not waited for.
OFFLINE_CHECK_SECONDS = 5.0
OFFLINE_AFTER_SECONDS = 15.0  # Flower drops a node 2 heartbeats (fedmoe-supernode: 10 s each) after its last


@dataclass
class Federation:
    grid: Grid
    job: JobConfig
    reporter: Reporter

    def __post_init__(self) -> None:
        self.store = ServerStore(self.job)
        self.state = self.store.load_or_init()
        # Public keys only: they can add ciphertexts and cannot decrypt (the loaders refuse a secret one).
        if self.job.aggregation == "secagg":
            self.secagg_keys = load_secagg_keys(self.job)
            self.key_id, self.key_epoch = self.secagg_keys.bfv.key_id, 0
        else:
            self.key = load_public_context(f"{self.job.key_dir}/{PUBLIC_FILE}")
            self.key_id, self.key_epoch = self.key.key_id, self.key.epoch
        # The layout every bundle must carry, from the job's config (no weights are built).
        self.layout_hash, self.n_elements = trainable_layout(self.job)
        self.node_bank: dict[int, str] = {int(k): v for k, v in self.state.node_bank.items()}
        self.connected: set[int] = set()  # the nodes connected when the current exchange started
        self.offline: dict[int, str] = {}  # nodes of the last exchange not waited for: why
        # The next secure-aggregation round's keys, advertised (and shared) during the last round or
        # this job's identify: a fedmoe.fl_server.secagg_round.Ahead. In memory only: after a restart the
        # round advertises and shares its keys in exchanges of its own.
        self.secagg_ahead: object | None = None
        self.grace_spent: set[str] = set()  # known banks the server waited rejoin-grace for in vain

    def save(self) -> None:
        self.state.node_bank = {str(node): bank for node, bank in self.node_bank.items()}
        self.store.save(self.state)

    def label(self, node: int) -> str:
        return self.node_bank.get(node, f"node-{node}")

    def bind(self, node: int, claimed: str) -> str:
        """Binds a node to the bank it says it is, once; "" if fine, else why the reply is refused.

        A node's bank never changes, and a bank that is bound to another node still connected
        cannot be claimed: a reply naming another bank is recorded against the node that sent it.
        A bank whose node is gone (a restarted SuperNode gets a new id) moves to the new node.
        """
        known = self.node_bank.get(node)
        if known is not None and known != claimed:
            return f"node {node} is {known!r}; its reply claims to be {claimed!r}"
        holder = next((n for n, b in self.node_bank.items() if b == claimed and n != node), None)
        if holder is not None and holder in self.connected:
            return f"{claimed!r} is node {holder}, which is connected; node {node} claims to be it"
        if holder is not None:
            logger.warning("%s moved from node %s (gone) to node %s", claimed, holder, node)
            del self.node_bank[holder]
        self.node_bank[node] = claimed
        return ""

    # ---- messaging ------------------------------------------------------------------------------
    def wait_for_banks(self) -> list[int]:
        """The connected nodes once the banks a round needs are (`banks_needed`), and once the job's
        known banks are back (a restarted SuperNode), or `rejoin-grace` has passed for those still
        away: then the round starts without them, and their grace is spent until they return (so a
        bank gone for good delays one round)."""
        deadline, need = time.monotonic() + self.job.round_timeout, self.banks_needed()[0]
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < need and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        away = self.known_banks_away(nodes)
        if away:
            self.reporter.note(f"waiting up to {self.job.rejoin_grace:g} s for {', '.join(away)} to reconnect")
            deadline = time.monotonic() + self.job.rejoin_grace
            while away and time.monotonic() < deadline:
                time.sleep(1.0)
                nodes = list(self.grid.get_node_ids())
                away = self.known_banks_away(nodes)
            if away:
                self.reporter.note(f"{', '.join(away)} not back within rejoin-grace {self.job.rejoin_grace:g} s")
            self.grace_spent.update(away)
        return nodes

    def known_banks_away(self, nodes: list[int]) -> list[str]:
        """Banks of this job that are neither connected nor out of it (budget spent, excluded), and whose
        grace is not spent. A restarted SuperNode without node auth comes back under a new node id,
        unknown until it identifies: it counts for any one missing bank."""
        known = {n: b for n, b in self.node_bank.items() if b not in {**self.state.exhausted, **self.state.excluded}}
        back = {known[n] for n in nodes if n in known}
        self.grace_spent -= back
        away = sorted(set(known.values()) - back - self.grace_spent)
        unknown = sum(1 for n in nodes if n not in self.node_bank)
        return away[unknown:]

    def request(
        self,
        node_id: int,
        round_idx: int,
        stage: SecAggStage | None = None,
        secagg: bytes = b"",
        catch_up: bool = True,
        secagg_next: bytes = b"",
    ) -> RoundRequest:
        """The request for one node; `catch_up`: with the aggregates its bank has not applied yet."""
        bank = self.node_bank.get(node_id)
        applied = self.state.applied.get(bank, 0) if bank else 0
        return RoundRequest(
            job_id=self.job.job_id,
            round=round_idx,
            key_id=self.key_id,
            key_epoch=self.key_epoch,
            aggregates=self.store.aggregates_after(self.state, applied) if catch_up else {},
            stage=stage,
            secagg=secagg,
            secagg_next=secagg_next,
        )

    def send(
        self, nodes: Iterable[int], round_idx: int, message_type: str
    ) -> tuple[list[tuple[int, Message]], set[int]]:
        """(node, reply) pairs and the nodes that did not answer within the round timeout."""
        return self.exchange({node: self.request(node, round_idx) for node in nodes}, round_idx, message_type)

    def exchange(
        self, requests: dict[int, RoundRequest], round_idx: int, message_type: str
    ) -> tuple[list[tuple[int, Message]], set[int]]:
        """Sends each node its request; (node, reply) pairs and the nodes silent within the round timeout."""
        messages = [
            Message(
                content=request.to_content(),
                message_type=message_type,
                dst_node_id=node,
                group_id=f"{self.job.job_id}-r{round_idx}",
            )
            for node, request in requests.items()
        ]
        self.connected = set(self.grid.get_node_ids())
        stored = set(self.grid.push_messages(messages))  # a message the SuperLink did not store: silent
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set by the push
        replies = self.collect({i: n for i, n in node_of.items() if i in stored}, f"round {round_idx} {message_type}")
        # Error replies made by the SuperLink (e.g. "node unavailable") come from the SuperLink,
        # not the bank: find the bank's node through the message they answer.
        pairs = [(node_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]
        return pairs, set(node_of.values()) - {node for node, _ in pairs}

    def collect(self, node_of: dict[str, int], what: str) -> list[Message]:
        """Pulls the replies to the pushed messages every POLL_SECONDS until all are in or the round
        timeout passes (Flower's send_and_receive sleeps 3 s between pulls: most of a short stage)."""
        waiting, replies = set(node_of), []
        started, failures = time.monotonic(), 0
        checked, missing_since = started, {}
        self.offline = {}
        while waiting and time.monotonic() - started < self.job.round_timeout:
            if time.monotonic() - checked >= OFFLINE_CHECK_SECONDS:
                checked = time.monotonic()
                self.stop_waiting_for_offline(waiting, node_of, missing_since, started, what)
            try:
                pulled = list(self.grid.pull_messages(waiting))
                failures = 0
            except Exception as err:  # noqa: BLE001 - e.g. HTTP 500 "database is locked" from a busy SuperLink
                failures += 1
                if failures > MAX_PULL_FAILURES:
                    raise
                logger.warning("%s: pulling replies failed (%s); retrying", what, err)
                pulled = []
            for reply in pulled:
                answers = reply.metadata.reply_to_message_id
                if answers not in waiting:  # a duplicate, or a reply to something not asked here
                    continue
                waiting.discard(answers)
                replies.append(reply)
                bank = self.label(node_of[answers])
                pending = sorted(self.label(node_of[m]) for m in waiting)
                self.reporter.answered(what, bank, pending, time.monotonic() - started)
            if waiting:
                time.sleep(POLL_SECONDS)
        return replies

    def stop_waiting_for_offline(
        self, waiting: set[str], node_of: dict[str, int], missing_since: dict[str, float], started: float, what: str
    ) -> None:
        """Drops from `waiting` the messages whose node the SuperLink has listed offline for
        OFFLINE_AFTER_SECONDS, and says why in `self.offline`."""
        try:
            online = set(self.grid.get_node_ids())
        except Exception as err:  # noqa: BLE001 - a busy SuperLink: ask again at the next check
            logger.warning("%s: listing the online nodes failed (%s)", what, err)
            return
        now = time.monotonic()
        for message in sorted(waiting):
            node = node_of[message]
            if node in online:
                missing_since.pop(message, None)
                continue
            since = missing_since.setdefault(message, now)
            if now - since >= OFFLINE_AFTER_SECONDS:
                waiting.discard(message)
                self.offline[node] = (
                    f"went offline (no heartbeat at the SuperLink since ~{since - started:.0f} s into the exchange); "
                    f"not waited for after {now - started:.0f} s of round-timeout {self.job.round_timeout:g} s"
                )
                self.reporter.note(f"{what}: {self.label(node)} went offline; not waiting for its reply")

    def silence(self, node: int) -> str:
        """Why a node of the last exchange gave no reply."""
        return self.offline.get(node, f"nothing within round-timeout {self.job.round_timeout:g} s")

    # ---- one round: select -> send -> collect -> aggregate -> record ----------------------------
    def select(self, nodes: list[int]) -> tuple[list[int], list[BankOutcome]]:
        """The nodes asked to train, and outcomes for banks that are not asked."""
        left_out = {**self.state.exhausted, **self.state.excluded}  # no budget left, or named a poisoner
        selected = [n for n in nodes if self.node_bank.get(n) not in left_out]
        connected = {self.label(n) for n in nodes}
        outcomes = [
            BankOutcome(self.node_bank[n], Outcome.NOT_SELECTED, left_out[self.node_bank[n]])
            for n in nodes
            if n not in selected
        ]
        outcomes += [BankOutcome(b, Outcome.NOT_CONNECTED) for b in self.state.seen if b not in connected]
        return selected, outcomes

    def read_train_reply(self, node: int, reply: Message, round_idx: int) -> BankOutcome:
        """A typed outcome for one train reply; the bank's budget state is updated from it."""
        if reply.has_error():
            return BankOutcome(self.label(node), Outcome.CLIENT_ERROR, reply.error.reason)
        try:
            tr = TrainReply.from_content(reply.content)
        except (ValueError, KeyError, TypeError) as err:
            return BankOutcome(self.label(node), Outcome.INVALID_REPLY, f"unreadable train reply: {err}")
        impostor = self.bind(node, tr.bank_id)
        if impostor:
            return BankOutcome(f"node-{node}", Outcome.INVALID_REPLY, impostor)
        self.state.applied[tr.bank_id] = tr.applied_round
        if tr.status is TrainStatus.AGGREGATE_REJECTED:
            return BankOutcome(tr.bank_id, Outcome.REJECTED_AGGREGATE, tr.reason, rejected_round=tr.rejected_round)
        if tr.status is TrainStatus.ALREADY_RELEASED:
            return BankOutcome(tr.bank_id, Outcome.ALREADY_RELEASED, tr.reason)
        outcome = BankOutcome(tr.bank_id, Outcome.CONTRIBUTED, metrics=tr.metrics, bundle=tr.bundle)
        outcome.next_bundle = tr.next_bundle
        outcome.start_hash = tr.start_hash  # checked against the other banks' in check_start
        outcome.applied_round = tr.applied_round
        outcome.eval_loss = tr.metrics.pop("eval-loss", None)  # of the model it started from (filed in record)
        if tr.ledger_commitment or (self.job.dp and tr.status is TrainStatus.OK):
            try:  # the bank's commitment to its ledger entry for this round, mirrored at the end
                outcome.commitment = check_commitment(
                    tr.ledger_commitment, bank_id=tr.bank_id, round=round_idx, job_id=self.job.job_id
                )
            except LedgerError as err:
                return BankOutcome(tr.bank_id, Outcome.INVALID_REPLY, f"invalid ledger commitment: {err}")
        if tr.status is TrainStatus.REFUSED:
            self.state.exhausted[tr.bank_id] = f"refused round {round_idx}: {tr.reason}"
            outcome.status, outcome.reason = Outcome.REFUSED, tr.reason
        elif outcome.commitment is not None and outcome.commitment["exhausted"]:
            self.state.exhausted[tr.bank_id] = f"budget exhausted after round {round_idx} (the bank's own verdict)"
        return outcome

    def check_start(self, outcomes: list[BankOutcome]) -> None:
        """Every bank must start from the same model: the start hash most banks report wins once."""
        contributed = [o for o in outcomes if o.status is Outcome.CONTRIBUTED]
        if not self.state.start_hash and contributed:
            self.state.start_hash = Counter(o.start_hash for o in contributed).most_common(1)[0][0]
        for o in contributed:
            if o.start_hash != self.state.start_hash:
                o.status = Outcome.INVALID_REPLY
                o.reason = f"start model differs: hash {o.start_hash[:12]}, the job's is {self.state.start_hash[:12]}"

    def aggregate(self, round_idx: int, outcomes: list[BankOutcome], record: RoundRecord) -> bytes | None:
        """Adds the contributions' ciphertexts; invalid ones become INVALID_CIPHERTEXT outcomes."""
        contributed = [o for o in outcomes if o.status is Outcome.CONTRIBUTED]
        expected = ExpectedHeader(self.key.key_id, self.key.epoch, round_idx, self.layout_hash, self.n_elements)
        started = time.perf_counter()
        result = aggregate([(o.bank, o.bundle) for o in contributed], key=self.key, expected=expected)
        record.seconds["aggregate"] = time.perf_counter() - started
        by_bank = {o.bank: o for o in contributed}
        for rejected in result.rejected:
            if rejected.bank_id in result.accepted:  # a second bundle for a bank: the first one stands
                logger.warning("round %d: %s sent a second bundle (%s)", round_idx, rejected.bank_id, rejected.message)
                continue
            by_bank[rejected.bank_id].status = Outcome.INVALID_CIPHERTEXT
            by_bank[rejected.bank_id].reason = f"{rejected.reason}: {rejected.message}"
        return result.bundle if len(result.accepted) >= self.job.min_banks else None

    def train_round(self, round_idx: int, nodes: list[int]) -> RoundRecord:
        record = RoundRecord(round=round_idx)
        selected, outcomes = self.select(nodes)
        if self.job.aggregation == "secagg":
            return self.secagg_round(round_idx, selected, outcomes, record)
        started = time.perf_counter()
        replies, silent = self.send(selected, round_idx, MessageType.TRAIN)
        record.seconds["round-trip"] = time.perf_counter() - started
        outcomes += [self.read_train_reply(node, reply, round_idx) for node, reply in replies]
        outcomes += [BankOutcome(self.label(n), Outcome.NO_REPLY, self.silence(n)) for n in silent]
        self.check_start(outcomes)
        self.quarantine_rejected(outcomes, record)
        bundle = self.aggregate(round_idx, outcomes, record)
        self.record(record, outcomes, bundle)
        if self.job.dp:
            self.mirror_ledgers(record.round, outcomes)
        return record

    def secagg_round(
        self, round_idx: int, selected: list[int], outcomes: list[BankOutcome], record: RoundRecord
    ) -> RoundRecord:
        """The secure-aggregation exchanges (fedmoe.fl_server.secagg_round), then the same bookkeeping."""
        started = time.perf_counter()
        secagg = SecAggRound(self, round_idx, record)
        bank_outcomes, bundle = secagg.run(selected)
        self.quarantine_rejected(outcomes + bank_outcomes, record)
        named = self.hold_accountable(round_idx, record, secagg) if record.quarantined else {}
        if named:  # the round again without the banks the verdicts named (their keys are fresh)
            secagg = SecAggRound(self, round_idx, record)
            bank_outcomes, bundle = secagg.run([n for n in selected if self.node_bank.get(n) not in named])
            bank_outcomes += [BankOutcome(bank, Outcome.NAMED, why) for bank, why in named.items()]
        record.seconds["round-trip"] = time.perf_counter() - started
        outcomes += bank_outcomes
        self.record(record, outcomes, bundle)
        if secagg.abort_text:
            record.no_aggregate = secagg.abort_text
        if self.job.dp:
            self.mirror_ledgers(record.round, outcomes)
        return record

    def hold_accountable(self, round_idx: int, record: RoundRecord, secagg: SecAggRound) -> dict[str, str]:
        """The reveal and accuse exchanges for each round quarantined in this one (fedmoe.fl_server.
        accountability); the banks most verdicts name are excluded from the job: {bank: finding}."""
        named: dict[str, str] = {}
        for quarantined in record.quarantined:
            driver = SecAggRound(self, round_idx, record)
            driver.nodes = dict(secagg.nodes)  # the banks identified in this round
            result = Accountability(driver, self.store, quarantined).run()
            if result is None:
                continue
            for bank, finding in result.named().items():
                logger.error("round %d: %s", round_idx, finding)
                self.state.excluded[bank] = finding
                named[bank] = finding
            record.named.update(result.named())
        return named

    def quarantine_rejected(self, outcomes: list[BankOutcome], record: RoundRecord) -> None:
        """An aggregate most answering banks rejected is never sent again (honest banks agree on it)."""
        rejecting = [o for o in outcomes if o.status is Outcome.REJECTED_AGGREGATE]
        asked = [o for o in outcomes if o.status not in (Outcome.NOT_SELECTED, Outcome.NOT_CONNECTED)]
        for round_idx, votes in Counter(o.rejected_round for o in rejecting).items():
            why = next(o.reason for o in rejecting if o.rejected_round == round_idx)
            if 2 * votes > len(asked) and self.state.quarantine(round_idx, why):
                logger.error("aggregate of round %d quarantined: %d bank(s) rejected it", round_idx, votes)
                record.quarantined.append(round_idx)

    def record(self, record: RoundRecord, outcomes: list[BankOutcome], bundle: bytes | None) -> None:
        contributed = [o for o in outcomes if o.status is Outcome.CONTRIBUTED]
        record.participants = sorted(o.bank for o in contributed)
        record.train_metrics = {o.bank: o.metrics for o in contributed}
        record.outcomes = {o.bank: str(o.status) for o in outcomes}
        record.left_out = {o.bank: _left_out_text(o) for o in outcomes if o.status is not Outcome.CONTRIBUTED}
        self.state.seen = sorted({*self.state.seen, *record.outcomes})
        for o in outcomes:  # a bank whose reply failed a check (e.g. another start model) has no loss to file
            if o.eval_loss is not None and o.status in (Outcome.CONTRIBUTED, Outcome.REFUSED, Outcome.ABORTED):
                self.record_eval(o.bank, o.applied_round, o.eval_loss)
        if bundle is not None:
            self.store.save_aggregate(record.round, bundle)
            record.aggregated = True
        else:
            record.no_aggregate = (
                f"only {len(contributed)} valid contribution(s), min-banks is {self.job.min_banks}: no aggregate"
            )

    def mirror_ledgers(self, round_idx: int, outcomes: list[BankOutcome]) -> None:
        """Appends this round to the server's per-bank ledger mirrors (the bank entries verbatim)."""
        mirror_dir = self.store.root / "ledger-mirror"
        for o in sorted(outcomes, key=lambda o: o.bank):
            if o.bank.startswith("node-"):  # never said which bank it is: nothing to mirror
                continue
            status = MIRROR_STATUS.get(o.status, "dropped")
            entry = o.commitment  # whenever one arrived (a "trained" one counts as spent)
            Ledger(mirror_path(mirror_dir, o.bank)).append(
                mirror_entry(
                    job_id=self.job.job_id,
                    bank_id=o.bank,
                    round=round_idx,
                    server_status=status,
                    commitment=entry,
                    reason=_left_out_text(o) if status != "received" else "",
                )
            )

    # ---- the job ----------------------------------------------------------------------------------
    def record_eval(self, bank: str, applied_round: int, loss: float) -> None:
        """A bank's held-out loss of the global model after `applied_round` (0: the start model)."""
        if applied_round == 0:
            self.state.eval_round0[bank] = loss
        for record in self.state.rounds:
            if record.round == applied_round:
                record.eval_loss[bank] = loss

    def close(self, nodes: list[int], round_idx: int) -> None:
        """The closing message: each bank applies the aggregates it lacks (and evaluates, where its
        policy releases the loss); during the job banks report that with their next train reply.

        Only nodes bound to a bank get it (under secure aggregation: by a signed identify), and an
        unsigned reply never re-binds a node. An aggregate most banks asked reject is quarantined here too.
        """
        bound = [n for n in nodes if n in self.node_bank]
        replies, silent = self.send(bound, round_idx, MessageType.EVALUATE)
        outcomes = [self.read_closing_reply(node, reply) for node, reply in replies]
        outcomes += [BankOutcome(self.node_bank[n], Outcome.NO_REPLY, "closing message") for n in silent]
        for o in outcomes:
            if o.status not in (Outcome.CONTRIBUTED, Outcome.REJECTED_AGGREGATE):
                logger.warning("closing message: %s %s: %s", o.bank, o.status, o.reason)
        record = self.state.rounds[-1]  # deliver_final sends it only once a round has an aggregate
        before = len(record.quarantined)
        self.quarantine_rejected(outcomes, record)
        if record.quarantined[before:]:
            self.state.end_reason += (
                f"; aggregate(s) {record.quarantined[before:]} quarantined by the banks at the closing message"
            )

    def read_closing_reply(self, node: int, reply: Message) -> BankOutcome:
        """A typed outcome of one closing reply (CONTRIBUTED: it applied the aggregates); losses are filed."""
        bank = self.node_bank[node]
        if reply.has_error():
            return BankOutcome(bank, Outcome.CLIENT_ERROR, reply.error.reason)
        try:
            ev = EvalReply.from_content(reply.content)
        except (ValueError, KeyError, TypeError) as err:
            return BankOutcome(bank, Outcome.INVALID_REPLY, f"unreadable closing reply: {err}")
        if ev.bank_id != bank:
            return BankOutcome(bank, Outcome.INVALID_REPLY, f"node {node} is {bank!r}; its reply claims {ev.bank_id!r}")
        self.state.applied[bank] = ev.applied_round
        if ev.rejected_round:
            return BankOutcome(bank, Outcome.REJECTED_AGGREGATE, ev.reason, rejected_round=ev.rejected_round)
        if ev.eval_loss is not None:  # only where the bank's policy releases it
            self.record_eval(bank, ev.applied_round, ev.eval_loss)
        return BankOutcome(bank, Outcome.CONTRIBUTED)

    def deliver_final(self, nodes: list[int]) -> None:
        """The closing message to every bank behind the last aggregate, whatever `evaluate` says."""
        last = max((r.round for r in self.state.rounds if r.aggregated), default=0)
        behind = [n for n in nodes if self.state.applied.get(self.node_bank.get(n, ""), 0) < last]
        if last and behind:
            self.close(behind, self.state.completed_round)
            self.save()

    def banks_needed(self) -> tuple[int, str]:
        """(banks a round needs, why more than min-banks): under secure aggregation every bank refuses
        a round of fewer than BANK_FLOOR, so starting one would only cost the banks a refusal."""
        if self.job.aggregation == "secagg" and self.job.min_banks < BANK_FLOOR:
            return BANK_FLOOR, f"; secure aggregation needs {BANK_FLOOR} (every bank refuses fewer)"
        return self.job.min_banks, ""

    def stop_reason(self, nodes: list[int], round_idx: int) -> tuple[str, bool] | None:
        """(why the job cannot run this round, whether a later resubmission can resume it)."""
        need, floor = self.banks_needed()
        if len(nodes) < need:
            return (
                f"only {len(nodes)} bank(s) connected before round {round_idx}, min-banks {self.job.min_banks}{floor}",
                True,
            )
        selectable = [n for n in nodes if self.node_bank.get(n) not in {**self.state.exhausted, **self.state.excluded}]
        if len(selectable) < need:
            return (
                f"job ended before round {round_idx}: {len(selectable)} bank(s) with privacy budget left, "
                f"min-banks {self.job.min_banks}{floor} (exhausted: {', '.join(sorted(self.state.exhausted))})"
            ), False
        return None

    def run_round(self, round_idx: int, nodes: list[int]) -> RoundRecord:
        started = time.perf_counter()
        record = self.train_round(round_idx, nodes)
        self.state.rounds.append(record)
        self.state.completed_round = round_idx
        # Saved before the aggregate reaches any bank (the next round's request, or the closing
        # message): a restart resumes after this round and never re-runs a round banks applied.
        record.seconds["round"] = time.perf_counter() - started
        self.save()
        self.store.write_metrics(self.state)
        self.reporter.round_done(record, self.state)
        return record

    def run(self) -> ServerState:
        state = self.state
        if state.finished:
            self.reporter.note(f"job {self.job.job_id!r} already finished ({state.end_reason})")
            self.deliver_final(self.wait_for_banks())  # what a crash may have withheld
            self.store.write_metrics(state)
            return state
        if state.completed_round:
            self.reporter.note(f"resuming job {self.job.job_id!r} after round {state.completed_round}")
        nodes = self.wait_for_banks()
        self.reporter.job_started(self, len(nodes))
        for round_idx in range(state.completed_round + 1, self.job.num_rounds + 1):
            nodes = self.wait_for_banks()
            stop = self.stop_reason(nodes, round_idx)
            if stop is not None:
                state.end_reason, resumable = stop
                if resumable:  # not finished: a later run of the same job resumes once banks are back
                    self.save()
                    self.reporter.note(f"[red]stopped[/]: {state.end_reason}; resubmit the job to resume")
                    return state
                break
            self.run_round(round_idx, nodes)
        else:
            missing = [r.round for r in state.rounds if not r.aggregated]
            state.end_reason = f"completed {self.job.num_rounds} rounds" + (
                f"; rounds without an aggregate (too few banks or quarantined): {missing}" if missing else ""
            )
        self.deliver_final(nodes)  # before "finished": a job is done when every bank holds the result
        state.finished = True
        self.save()
        self.store.write_metrics(state)
        path = self.store.write_results(state, {"layout-hash": self.layout_hash, "n-elements": self.n_elements})
        self.reporter.job_done(self)
        self.reporter.note(f"results: {path}")
        return state


def _left_out_text(outcome: BankOutcome) -> str:
    """The human-readable reason kept in state.json / results.json and the mirror."""
    if outcome.status is Outcome.NOT_CONNECTED or not outcome.reason:
        return str(outcome.status)
    return f"{outcome.status}: {outcome.reason}"
