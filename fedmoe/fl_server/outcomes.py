"""What became of each bank in a round (typed outcomes), and where the round loop reports events.

Kept apart from federation.py (the round loop) so that secagg_round.py, the secure-aggregation
driver federation.py runs, can use them without importing the loop: imports go one way,
federation -> secagg_round -> outcomes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from fedmoe.fl_server.state import RoundRecord, ServerState
from fedmoe.protocol.ledger import NAMED_POISONER


class Outcome(StrEnum):
    """What became of one bank in one round (typed: nothing is decided by parsing reason text)."""

    CONTRIBUTED = "contributed"
    NOT_SELECTED = "not selected"  # its budget is spent
    NOT_CONNECTED = "not connected"  # a bank of earlier rounds that is gone
    NO_REPLY = "no reply"
    CLIENT_ERROR = "client error"
    REFUSED = "refused"  # the bank's own policy or budget said no
    INVALID_REPLY = "invalid reply"  # unreadable reply, bad ledger entry, other start model
    INVALID_CIPHERTEXT = "invalid ciphertext"
    REJECTED_AGGREGATE = "rejected an aggregate"  # it found an aggregate it was sent invalid
    # secure aggregation (fedmoe.fl_server.secagg_round)
    ALREADY_RELEASED = "already released"  # released this round under other round keys (a restarted round)
    EXCLUDED = "excluded by secure aggregation"  # left out at a stage with a typed reason (signature, share, ...)
    ABORTED = "aborted by others"  # its masked input was valid; others (named in the reason) broke the round
    CRASHED = "crashed after ready"  # said ready at the pre-flight, then fell silent or failed (no reply, error)
    NAMED = NAMED_POISONER  # most banks' signed verdicts found its input of a quarantined round out of bound


# What the server's ledger mirror records for each outcome.
MIRROR_STATUS = {Outcome.CONTRIBUTED: "received", Outcome.NOT_SELECTED: "skipped", Outcome.NOT_CONNECTED: "skipped"}


@dataclass
class BankOutcome:
    bank: str  # the bank id, or "node-<id>" for a node that never said which bank it is
    status: Outcome
    reason: str = ""
    commitment: dict | None = None  # to the bank's ledger entry of this round
    metrics: dict[str, float] = field(default_factory=dict)
    bundle: bytes = b""
    start_hash: str = ""
    rejected_round: int = 0
    applied_round: int = 0
    eval_loss: float | None = None  # of the global model after `applied_round`, measured before training
    next_bundle: bytes = b""  # secure aggregation: the next round's KeyAdvertisement, sent with the masked input


class Reporter(Protocol):
    """Where the loop's events go (the console in the ServerApp; nothing in tests).

    `federation` is the federation.Federation running the job (typed loosely so this module, which
    the round drivers import, does not import the loop).
    """

    def job_started(self, federation: Any, n_banks: int) -> None: ...
    def answered(self, what: str, bank: str, pending: list[str], seconds: float) -> None: ...
    def round_done(self, record: RoundRecord, state: ServerState) -> None: ...
    def job_done(self, federation: Any) -> None: ...
    def note(self, text: str) -> None: ...
