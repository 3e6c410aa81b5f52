"""One secure-aggregation round over the Flower Grid (docs/secagg.md): the server's side.

The ServerApp drives `fedmoe.crypto.secagg.server.ServerSecAgg` through ordinary Flower messages, one
exchange per stage, each sent as message type "train.secagg_<stage>" with a RoundRequest whose
`secagg` field carries the stage's request (the bank side answers in its secagg_bank module):

  identify      only nodes not yet bound to a bank: the bank signs (job, round, bank, node) with its
                pinned identity key; the node is bound (Federation.bind) only if that verifies
  advertise     RoundSetup (participants: the identified, selected banks) -> KeyAdvertisement;
                skipped when every participant advertised keys for exactly this setup "ahead": with
                the previous round's masked input (its request carries the next round's setup), or
                in a fresh job with its identify (the request carries the setup for all pinned banks)
  share_keys    ShareKeysRequest -> ShareKeysReply; skipped when every participant shared its keys
                for exactly this setup with the previous round's unmask (the order carries the next
                round's ShareKeysRequest)
  masked_input  MaskedInputRequest + the aggregates the bank lacks (+ the next round's RoundSetup) ->
                the bank catches up, trains once (DP-SGD, ledger first) and sends its masked,
                BFV-encrypted update (TrainReply: status, start hash, ledger commitment, MaskedInput;
                + its KeyAdvertisement for the next round)
  consent       UnmaskRequest -> UnmaskConsent; only when a bank dropped before unmasking
  unmask        UnmaskOrder (+ the next round's ShareKeysRequest) -> UnmaskReply (+ the next round's
                ShareKeysReply); the server removes the residual masks: SecureAggregate

So a steady round is two exchanges (masked input, unmask); round 1 of a fresh job four (identify,
share keys, masked input, unmask). A stage that times out moves on with the banks that answered
(a missing bank counts as dropped).
Every reply must come from the node bound to the bank it names; the secagg messages are signed
with that bank's pinned key and ServerSecAgg checks them. A round that cannot be unmasked raises
SecAggAbort: nothing is stored, its typed reason and each bank's exclusion are recorded. The
stored aggregate is the RoundSetup plus the SecureAggregate (fedmoe.protocol.messages.pack_secagg_result):
the server never sees a plaintext update or sum. It imports no bank or secret-key code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

from flwr.app import Message

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import ConsortiumPins, load_pins
from fedmoe.crypto.secagg.bfv import PUBLIC_FILE as BFV_PUBLIC_FILE
from fedmoe.crypto.secagg.bfv import BfvKey, load_bfv_public
from fedmoe.crypto.secagg.messages import Exclusion, RoundSetup, SecAggAbort, SecureAggregate
from fedmoe.crypto.secagg.messages import Message as SecAggMessage
from fedmoe.crypto.secagg.params import BANK_FLOOR
from fedmoe.crypto.secagg.server import ServerSecAgg
from fedmoe.fl_server.outcomes import BankOutcome, Outcome, Reporter
from fedmoe.fl_server.state import RoundRecord, ServerState, ServerStore
from fedmoe.protocol.config import PINS_FILE, JobConfig
from fedmoe.protocol.messages import (
    PREFLIGHT_NOT_READY,
    PREFLIGHT_READY,
    RoundRequest,
    SecAggStage,
    TrainReply,
    TrainStatus,
    identify_statement,
    pack_secagg_result,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggServerKeys:
    """What the server holds for secure aggregation: the BFV public context and the consortium pins."""

    bfv: BfvKey
    pins: ConsortiumPins


@dataclass(frozen=True)
class Ahead:
    """A round's secure-aggregation stages done before it started: its participants' advertisements
    (with the last round's masked inputs, or this job's identify), and when they also shared their
    keys (with the last round's unmask) the round's ServerSecAgg and its masked-input requests."""

    setup: RoundSetup
    advertisements: dict[str, bytes] | None = None
    server: ServerSecAgg | None = None
    masked_requests: dict[str, SecAggMessage] | None = None
    preflight: dict[str, str] | None = None  # each participant's pre-flight, with its shares ahead


def load_secagg_keys(job: JobConfig) -> SecAggServerKeys:
    return SecAggServerKeys(
        load_bfv_public(f"{job.key_dir}/{BFV_PUBLIC_FILE}"), load_pins(f"{job.key_dir}/{PINS_FILE}")
    )


class RoundHost(Protocol):
    """What a round driver (secagg_round.SecAggRound) uses of the round loop (federation.Federation)."""

    job: JobConfig
    state: ServerState
    reporter: Reporter
    secagg_keys: SecAggServerKeys
    secagg_ahead: Ahead | None
    layout_hash: str
    n_elements: int
    node_bank: dict[int, str]
    store: ServerStore

    def bind(self, node: int, claimed: str) -> str: ...
    def check_start(self, outcomes: list[BankOutcome]) -> None: ...
    def read_train_reply(self, node: int, reply: Message, round_idx: int) -> BankOutcome: ...
    def request(
        self,
        node_id: int,
        round_idx: int,
        stage: SecAggStage | None = None,
        secagg: bytes = b"",
        catch_up: bool = True,
        secagg_next: bytes = b"",
    ) -> RoundRequest: ...
    def exchange(
        self, requests: dict[int, RoundRequest], round_idx: int, message_type: str
    ) -> tuple[list[tuple[int, Message]], set[int]]: ...


class SecAggRound:
    """One round: identify -> the secagg stages -> typed outcome per bank (+ the stored aggregate)."""

    def __init__(self, federation: RoundHost, round_idx: int, record: RoundRecord) -> None:
        self.fed, self.round, self.record = federation, round_idx, record
        self.keys: SecAggServerKeys = federation.secagg_keys
        self.nodes: dict[str, int] = {}  # bank -> its node in this round
        self.failed: dict[str, BankOutcome] = {}  # the first failure of each bank (or unnamed node)
        self.trained: dict[str, BankOutcome] = {}  # masked-input replies: status, commitment, metrics
        self.abort_text = ""
        self.bytes_sent = self.bytes_received = 0
        self.ahead: dict[str, bytes] = {}  # this round's advertisements that came with identify replies
        self.next_ads: dict[str, bytes] = {}  # the next round's, with masked-input replies
        self.next_shares: dict[str, bytes] = {}  # the next round's ShareKeysReply, with unmask replies
        self.preflight: dict[str, str] = {}  # this round's pre-flight verdicts, with share-keys replies
        self.next_preflight: dict[str, str] = {}  # the next round's, with unmask replies

    # ---- the round --------------------------------------------------------------------------------
    def run(self, selected: list[int]) -> tuple[list[BankOutcome], bytes | None]:
        self.identify(selected)
        participants = sorted(self.nodes)
        job = self.fed.job
        server, aggregate = None, None
        if len(participants) < max(2, job.min_banks):
            self.abort_text = f"only {len(participants)} identified bank(s), min-banks {job.min_banks}: no round"
            return self.settle(None, []), None
        try:
            setup = self.setup_for(self.round, participants)
            ahead = self.take_ahead(setup)
            server = ahead.server if ahead.server is not None else ServerSecAgg(setup, self.keys.pins, self.keys.bfv)
            aggregate = self.stages(server, ahead)
        except SecAggAbort as abort:
            self.abort_text = f"secure aggregation aborted ({abort.reason}): {abort}"
        except CryptoError as err:  # the setup itself breaks the policy (e.g. too few banks for a threshold)
            self.abort_text = f"no secure-aggregation round with {len(participants)} bank(s): {err}"
        if self.abort_text:
            logger.error("round %d: %s", self.round, self.abort_text)
        exclusions = server.exclusions if server is not None else []
        outcomes = self.settle(aggregate, exclusions)
        stages = ", ".join(
            f"{k[7:-6].replace('_', ' ')} ahead" if k.endswith("-ahead") else f"{k[7:].replace('_', ' ')} {v:.1f}s"
            for k, v in self.record.seconds.items()
            if k.startswith("secagg-")
        )
        self.fed.reporter.note(
            f"round {self.round} secure aggregation: {stages}; {self.bytes_sent / 1e6:.2f} MB to banks, "
            f"{self.bytes_received / 1e6:.2f} MB from banks"
        )
        if aggregate is None:
            return outcomes, None
        self.fed.store.keep_evidence(self.round, server.evidence().to_bytes())  # banks may quarantine it next round
        return outcomes, pack_secagg_result(setup.to_bytes(), aggregate.to_bytes())

    def stages(self, server: ServerSecAgg, ahead: Ahead) -> SecureAggregate:
        """Advertise and share keys unless done ahead, then masked input, consent (only after a drop)
        and unmask, carrying the next round's advertise and share-keys stages; each stage's missing
        banks count as dropped (ServerSecAgg decides)."""
        setup = server.setup
        if ahead.masked_requests is not None:
            masked_requests = ahead.masked_requests
            self.preflight = dict(ahead.preflight or {})
        else:
            replies = ahead.advertisements
            if replies is None:
                replies = self.exchange(SecAggStage.ADVERTISE, dict.fromkeys(setup.participants, setup))
            requests = self.server_work(server.receive_advertisements, replies)
            replies = self.exchange(SecAggStage.SHARE_KEYS, requests)
            masked_requests = self.server_work(server.receive_shares, replies)
        masked_requests = self.preflight_gate(server, masked_requests)
        next_setup = self.next_setup(setup)
        following = dict.fromkeys(masked_requests, next_setup.to_bytes()) if next_setup is not None else {}
        replies = self.exchange(SecAggStage.MASKED_INPUT, masked_requests, following)
        unmask_requests = self.server_work(server.receive_masked_inputs, replies)
        orders = server.orders_without_consent()  # nobody dropped: no consent exchange
        if orders is None:
            replies = self.exchange(SecAggStage.CONSENT, unmask_requests)
            orders = self.server_work(server.receive_consents, replies)
        next_server, share_requests = self.server_work(self.next_share_requests, next_setup, set(orders))
        following = {b: q.to_bytes() for b, q in share_requests.items()}
        replies = self.exchange(SecAggStage.UNMASK, orders, following)
        if next_server is not None:  # kept even if this round aborts below: the next round's keys are its own
            self.fed.secagg_ahead = self.server_work(self.next_masked_requests, next_server)
        return self.server_work(server.receive_unmask, replies)

    def preflight_gate(self, server: ServerSecAgg, requests: dict[str, SecAggMessage]) -> dict[str, SecAggMessage]:
        """Masked-input requests only for the banks whose pre-flight said ready (or said nothing: an older
        bank), and none at all when those are fewer than the round needs: then nobody trains, and
        nobody spends budget on a round that cannot be unmasked (issue 27). A refusing bank shared its
        keys, so the round goes on without it as if it had dropped before its masked input."""
        refused = {b: v for b, v in self.preflight.items() if b in requests and v not in ("", PREFLIGHT_READY)}
        for bank, why in sorted(refused.items()):
            self.fail(bank, Outcome.REFUSED, f"pre-flight: {why}")
            if not why.startswith(PREFLIGHT_NOT_READY):  # its policy or budget: it refuses later rounds too
                self.fed.state.exhausted[bank] = f"refused the pre-flight of round {self.round}: {why}"
        ready = {b: r for b, r in requests.items() if b not in refused}
        need = max(server.setup.threshold, server.setup.min_banks, BANK_FLOOR)  # every bank refuses fewer
        if refused and len(ready) < need:
            raise SecAggAbort(
                f"pre-flight: {len(ready)} of {len(requests)} banks ready, the round needs {need}: nobody "
                "trained", reason="too_few",
            )  # fmt: skip
        return ready

    # ---- the next round's keys, ahead ------------------------------------------------------------
    def setup_for(self, round_idx: int, participants) -> RoundSetup:
        return ServerSecAgg.make_setup(
            job_id=self.fed.job.job_id, round=round_idx, participants=participants, n_elements=self.fed.n_elements,
            key=self.keys.bfv, layout_hash=self.fed.layout_hash, min_banks=self.fed.job.min_banks,
            neighbours_k=self.fed.job.secagg_neighbours,
        )  # fmt: skip

    def next_setup(self, setup: RoundSetup) -> RoundSetup | None:
        """The next round's setup for the same participants, sent with the masked-input requests: the
        banks advertise its keys in that exchange. Used only if the next round's setup comes out equal."""
        if self.round >= self.fed.job.num_rounds:
            return None
        try:
            return self.setup_for(self.round + 1, setup.participants)
        except CryptoError:
            return None

    def next_share_requests(self, next_setup: RoundSetup | None, ordered: set[str]) -> tuple[ServerSecAgg | None, dict]:
        """The next round's ServerSecAgg and share-keys requests (sent with the unmask orders), when
        every participant advertised for it with its masked input, every advertisement verified, each
        gets an unmask order and none has spent its budget (else the next round's setup will differ
        and the shares would be dealt for nothing). Otherwise the next round advertises itself."""
        ads, self.next_ads = self.next_ads, {}
        if next_setup is None or set(ads) != set(next_setup.participants) or ordered != set(ads):
            return None, {}
        if set(ads) & set(self.fed.state.exhausted):
            return None, {}
        try:
            next_server = ServerSecAgg(next_setup, self.keys.pins, self.keys.bfv)
        except CryptoError:
            return None, {}
        requests = _all_accepted(next_server, next_server.receive_advertisements, ads)
        return (next_server, requests) if requests is not None else (None, {})

    def next_masked_requests(self, next_server: ServerSecAgg) -> Ahead | None:
        """The next round ready to start at its masked input, if every participant shared its keys with
        its unmask reply. Any gap: the banks that shared may not share again, so the next round
        advertises afresh (a bank re-keys a round whose keys it already shared)."""
        shares, self.next_shares = self.next_shares, {}
        setup = next_server.setup
        if set(shares) != set(setup.participants):
            return None
        requests = _all_accepted(next_server, next_server.receive_shares, shares)
        if requests is None:
            return None
        return Ahead(setup, server=next_server, masked_requests=requests, preflight=dict(self.next_preflight))

    def take_ahead(self, setup: RoundSetup) -> Ahead:
        """What was done ahead for exactly this setup (nothing if the setup differs), recorded as
        `secagg-<stage>-ahead` in the round's seconds."""
        ahead, self.fed.secagg_ahead = self.fed.secagg_ahead, None
        if not isinstance(ahead, Ahead) or ahead.setup != setup:
            return Ahead(setup)
        self.record.seconds["secagg-advertise-ahead"] = 0.0
        if ahead.masked_requests is not None:
            self.record.seconds["secagg-share_keys-ahead"] = 0.0
        return ahead

    def guessed_setup(self, selected: list[int], unbound: list[int]) -> RoundSetup | None:
        """When every selected node is new and there are as many as pinned banks (a fresh job, or every
        SuperNode restarted): this round's setup for all of them, sent with the identify request so
        each bank advertises with its binding. Used only if the identified banks make exactly this
        setup; it replaces anything done ahead (the banks' round keys are now the guess's)."""
        if len(unbound) != len(selected) or len(selected) != len(self.keys.pins.keys):
            return None
        try:
            return self.setup_for(self.round, sorted(self.keys.pins.keys))
        except CryptoError:
            return None

    def server_work(self, step, *args):
        """One ServerSecAgg step; its time adds up in seconds["aggregate"] (the server's own compute)."""
        started = time.perf_counter()
        try:
            return step(*args)
        finally:
            self.record.seconds["aggregate"] = self.record.seconds.get("aggregate", 0.0) + time.perf_counter() - started

    # ---- identities -----------------------------------------------------------------------------
    def identify(self, selected: list[int]) -> None:
        """Binds unbound nodes to the pinned bank whose key signed their reply; picks the participants."""
        unbound = [n for n in selected if n not in self.fed.node_bank]
        if unbound:
            guess = self.guessed_setup(selected, unbound)
            following = guess.to_bytes() if guess is not None else b""
            requests = {
                n: self.fed.request(n, self.round, SecAggStage.IDENTIFY, catch_up=False, secagg_next=following)
                for n in unbound
            }
            self.bytes_sent += sum(len(r.secagg_next) for r in requests.values())
            pairs, silent = self.fed.exchange(requests, self.round, SecAggStage.IDENTIFY.message_type)
            for node, reply in pairs:
                self.bind_signed(node, reply)
            for node in silent:
                self.fail(f"node-{node}", Outcome.NO_REPLY, self.silence(SecAggStage.IDENTIFY, node))
            if guess is not None:  # the banks' round keys are now the guess's: an older set ahead is stale
                complete = set(self.ahead) == set(guess.participants)
                self.fed.secagg_ahead = Ahead(guess, advertisements=dict(self.ahead)) if complete else None
            self.ahead = {}
        for node in selected:
            bank = self.fed.node_bank.get(node)
            if bank is None:
                continue
            if bank not in self.keys.pins:
                self.fail(bank, Outcome.INVALID_REPLY, "not a pinned consortium member")
                continue
            self.nodes[bank] = node

    def bind_signed(self, node: int, reply: Message) -> None:
        label = f"node-{node}"
        tr = self.read(label, reply)
        if tr is None:
            return
        statement = identify_statement(job_id=self.fed.job.job_id, round=self.round, bank_id=tr.bank_id, node_id=node)
        try:
            self.keys.pins.verify(tr.bank_id, statement, tr.bundle)
        except CryptoError as err:
            self.fail(label, Outcome.INVALID_REPLY, f"identify: claims {tr.bank_id!r}: {err} ({err.reason})")
            return
        refused = self.fed.bind(node, tr.bank_id)
        if refused:
            self.fail(label, Outcome.INVALID_REPLY, refused)
        elif tr.next_bundle:  # its advertisement for the guessed setup: checked when the round uses it
            self.ahead[tr.bank_id] = tr.next_bundle
            self.bytes_received += len(tr.next_bundle)

    # ---- one exchange -----------------------------------------------------------------------------
    def exchange(
        self, stage: SecAggStage, requests: dict[str, SecAggMessage], following: dict[str, bytes] | None = None
    ) -> dict[str, bytes]:
        """Sends each bank its stage request (+ `following[bank]`: the next round's stage it carries);
        {bank: reply payload} of the banks that answered validly."""
        catch_up = stage is SecAggStage.MASKED_INPUT
        following = following or {}
        wire = {
            self.nodes[b]: self.fed.request(
                self.nodes[b], self.round, stage, m.to_bytes(), catch_up=catch_up, secagg_next=following.get(b, b"")
            )
            for b, m in requests.items()
        }
        self.bytes_sent += sum(
            len(r.secagg) + len(r.secagg_next) + sum(map(len, r.aggregates.values())) for r in wire.values()
        )
        started = time.perf_counter()
        pairs, silent = self.fed.exchange(wire, self.round, stage.message_type)
        self.record.seconds[f"secagg-{stage}"] = time.perf_counter() - started
        bank_of = {node: bank for bank, node in self.nodes.items()}
        out: dict[str, bytes] = {}
        for node, reply in pairs:
            payload = self.accept(stage, bank_of[node], node, reply)
            if payload is not None:
                self.bytes_received += len(payload)
                out[bank_of[node]] = payload
        for node in silent:
            self.fail(bank_of[node], Outcome.NO_REPLY, self.silence(stage, node))
        if stage is SecAggStage.MASKED_INPUT:  # every bank must start from the model most banks report
            self.fed.check_start(list(self.trained.values()))
            out = {b: p for b, p in out.items() if self.trained[b].status is Outcome.CONTRIBUTED}
        return out

    def accept(self, stage: SecAggStage, bank: str, node: int, reply: Message) -> bytes | None:
        """The reply's payload if it is a valid answer of `bank` at `stage`; else its failure is recorded."""
        if stage is SecAggStage.MASKED_INPUT:
            outcome = self.fed.read_train_reply(node, reply, self.round)
            self.trained[outcome.bank] = outcome
            if outcome.status is not Outcome.CONTRIBUTED:
                return None
            if outcome.next_bundle:  # checked like any advertisement when the next round uses it
                self.next_ads[outcome.bank] = outcome.next_bundle
                self.bytes_received += len(outcome.next_bundle)
            return outcome.bundle
        tr = self.read(bank, reply)
        if tr is None:
            return None
        if tr.bank_id != bank:
            self.fail(bank, Outcome.INVALID_REPLY, f"{stage}: node {node} is {bank!r}; its reply claims {tr.bank_id!r}")
            return None
        if tr.status is TrainStatus.ALREADY_RELEASED:
            self.fail(bank, Outcome.ALREADY_RELEASED, tr.reason)
            return None
        if tr.status is not TrainStatus.OK or tr.round != self.round:
            self.fail(bank, Outcome.INVALID_REPLY, f"{stage}: status {tr.status} for round {tr.round}")
            return None
        if stage is SecAggStage.UNMASK and tr.next_bundle:
            self.next_shares[bank] = tr.next_bundle  # checked by the next round's ServerSecAgg
            self.next_preflight[bank] = tr.preflight
            self.bytes_received += len(tr.next_bundle)
        if stage is SecAggStage.SHARE_KEYS:
            self.preflight[bank] = tr.preflight
        return tr.bundle

    def read(self, label: str, reply: Message) -> TrainReply | None:
        if reply.has_error():
            self.fail(label, Outcome.CLIENT_ERROR, reply.error.reason)
            return None
        try:
            return TrainReply.from_content(reply.content)
        except (ValueError, KeyError, TypeError) as err:
            self.fail(label, Outcome.INVALID_REPLY, f"unreadable reply: {err}")
            return None

    def fail(self, who: str, status: Outcome, reason: str) -> None:
        self.failed.setdefault(who, BankOutcome(who, status, reason))

    def silence(self, stage: SecAggStage, node: int) -> str:
        offline = self.fed.offline.get(node)
        if offline is not None:
            return f"nothing at stage {stage}: {offline}"
        return f"nothing at stage {stage} within round-timeout {self.fed.job.round_timeout:g} s"

    # ---- outcomes ---------------------------------------------------------------------------------
    def culprits_text(self, excluded: dict[str, str]) -> str:
        """'; caused by: bank-3 refused (...), bank-4 excluded at masked_input (...)': the banks whose
        refusal, failure or exclusion left the round below its threshold (empty when none is known)."""
        causes = {**self.failed, **self.trained}
        names = sorted(w for w, o in causes.items() if o.status is not Outcome.CONTRIBUTED) + sorted(
            w for w in excluded if w not in causes or causes[w].status is Outcome.CONTRIBUTED
        )
        if not names:
            return ""
        return "; caused by: " + ", ".join(_culprit_text(w, causes.get(w), excluded) for w in names)

    def settle(self, aggregate: SecureAggregate | None, exclusions: list[Exclusion]) -> list[BankOutcome]:
        """One typed outcome per bank: contributed (in the signed contributor list) or why not."""
        for outcome in [*self.failed.values(), *self.trained.values()]:
            self.name_crash(outcome)
        contributors = set(aggregate.contributors) if aggregate is not None else set()
        excluded = {}
        for e in exclusions:  # the first exclusion of a bank is why it left
            excluded.setdefault(e.bank_id, f"{e.stage} ({e.reason}): {e.message}")
        # 'too_few' exclusions are the abort's consequence (a bank whose input would be exposed), not a cause
        caused = {e.bank_id: excluded[e.bank_id] for e in exclusions if e.reason != "too_few"}
        if aggregate is None and self.abort_text:  # say who broke the round, and why
            self.abort_text += self.culprits_text(caused)
        outcomes = []
        for who in sorted({*self.nodes, *self.failed, *self.trained}):
            trained = self.trained.get(who)
            if trained is not None and trained.status is Outcome.CONTRIBUTED:
                if aggregate is None and who in caused:  # one of the causes, under its own reason
                    trained.status, trained.reason = Outcome.EXCLUDED, caused[who]
                elif aggregate is None:  # a valid masked input, but nothing was unmasked
                    trained.status, trained.reason = Outcome.ABORTED, self.abort_text
                elif who not in contributors:
                    trained.status, trained.reason = Outcome.EXCLUDED, excluded.get(who, "not in the sum")
                outcomes.append(trained)
            elif trained is not None:
                outcomes.append(trained)  # refused, rejected an aggregate, invalid reply, ...
            elif who in self.failed:
                outcomes.append(self.failed[who])
            elif who in excluded:
                outcomes.append(BankOutcome(who, Outcome.EXCLUDED, excluded[who]))
            else:  # identified, but the round ended before it was asked anything
                outcomes.append(BankOutcome(who, Outcome.ABORTED, self.abort_text))
        return outcomes

    def name_crash(self, outcome: BankOutcome) -> None:
        """A bank that said ready at the pre-flight and then went silent or failed crashed (issue 27):
        everything that could refuse was checked before it trained, so its failure is not a refusal."""
        if self.preflight.get(outcome.bank) == PREFLIGHT_READY and outcome.status in CRASH_SIGNS:
            outcome.reason = f"said ready at the pre-flight, then {outcome.status}: {outcome.reason}"
            outcome.status = Outcome.CRASHED


CRASH_SIGNS = (Outcome.NO_REPLY, Outcome.CLIENT_ERROR)  # after "ready": a crash, named as such


def _culprit_text(who: str, outcome: BankOutcome | None, excluded: dict[str, str]) -> str:
    if outcome is not None and outcome.status is not Outcome.CONTRIBUTED:
        return f"{who} {outcome.status}" + (f" ({outcome.reason[:160]})" if outcome.reason else "")
    return f"{who} excluded at {excluded[who][:160]}"


def _all_accepted(server: ServerSecAgg, step, replies: dict[str, bytes]) -> dict | None:
    """`step(replies)` on the next round's ServerSecAgg, only if it excludes nobody and answers every
    participant: a round prepared ahead starts with all of them or is not prepared at all."""
    try:
        requests = step(replies)
    except CryptoError:
        return None
    if server.exclusions or set(requests) != set(server.setup.participants):
        return None
    return requests
