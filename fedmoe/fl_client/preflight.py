"""Pre-flight: everything that could make a bank refuse a round, checked before any bank trains.

Under secure aggregation a round needs at least t masked inputs. A bank that refused only at its
masked input (policy, budget, data, disk) used to abort the round after the others had trained and
spent their budget for nothing (issue 27: two of five banks could drain every honest bank's budget).
So a bank answers a pre-flight with the keys it shares for a round (the share-keys stage, or ahead
with the last round's unmask: no extra exchange in a steady round): ready, or the refusal. The
server sends masked-input requests only to ready banks, and only when they are at least the
threshold. A bank that fails after saying ready still aborts a round at the threshold; the round's
record names it (refused, no reply, client error), not yet as a crash after "ready".

What leaves the bank is what a refusal at masked input would say (the rule and the policy's limit,
never a number derived from its data); an unexpected error is named by its type only, its text
(which may quote a record) stays in the bank's log.
"""

from __future__ import annotations

import logging
import shutil

from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.dp import DPError
from fedmoe.fl_client.errors import DataError
from fedmoe.fl_client.policy import Refusal
from fedmoe.fl_client.privacy import BankPrivacy
from fedmoe.fl_client.task import load_bank_data
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.errors import ConfigError
from fedmoe.protocol.ledger import LedgerError
from fedmoe.protocol.messages import PREFLIGHT_NOT_READY, PREFLIGHT_READY

logger = logging.getLogger(__name__)

# Free disk a bank needs for one round's state (replica, ledger, round keys, replies): far above it.
MIN_FREE_BYTES = 256 * 2**20
ANY_VOCAB = 2**31  # pre-flight builds no model: the tokenizer-vs-model check runs when the bank trains


def preflight(job: JobConfig, config: BankConfig, round_idx: int) -> str:
    """PREFLIGHT_READY, or why this bank would refuse round `round_idx` (the text the server may see)."""
    try:
        refusals = round_refusals(job, config)
    except (ConfigError, DataError, DPError, LedgerError, OSError) as err:
        logger.error("bank %s pre-flight of round %d: %r", config.bank_id, round_idx, err)
        return f"{PREFLIGHT_NOT_READY}: {type(err).__name__} at the bank (its log names it)"
    if refusals:
        text = "; ".join(map(str, refusals))
        logger.warning("bank %s pre-flight of round %d: refuses: %s", config.bank_id, round_idx, text)
        return text
    return PREFLIGHT_READY


def round_refusals(job: JobConfig, config: BankConfig) -> list[Refusal]:
    """The refusals of the bank's next round, from its policy, data, ledger and free disk."""
    where = config.state_root.absolute()
    while not where.exists():  # a new bank's state folder is made when it first trains
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < MIN_FREE_BYTES:
        bound = f"the bank keeps at least {MIN_FREE_BYTES >> 20} MiB free for its state"
        return [Refusal("disk", free >> 20, bound, rule="disk-space", of_policy=True)]
    data = load_bank_data(job, config, ANY_VOCAB)
    return BankPrivacy(job, config, data).policy_refusals()
