"""An in-process driver for secure-aggregation rounds, with hooks to drop, tamper and collude."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmoe.crypto.identity import ConsortiumPins, Identity
from fedmoe.crypto.secagg.bank import BankSecAgg
from fedmoe.crypto.secagg.bfv import BfvKey
from fedmoe.crypto.secagg.messages import RoundSetup, SecureAggregate
from fedmoe.crypto.secagg.server import ServerSecAgg

JOB = "job-secagg"


def make_updates(banks: list[str], n: int, *, seed: int = 0, scale: float = 1e-3) -> tuple[dict, dict]:
    """Random float32 deltas ~ DP-noised LoRA-B updates and integer sample-count weights."""
    rng = np.random.default_rng(seed)
    updates = {b: (rng.standard_normal(n) * scale).astype(np.float32) for b in banks}
    weights = {b: float(rng.integers(500, 5000)) for b in banks}
    return updates, weights


def weighted_mean(updates: dict, weights: dict, banks: list[str]) -> np.ndarray:
    total = sum(weights[b] for b in banks)
    return sum(weights[b] * updates[b].astype(np.float64) for b in banks) / total


Hook = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class Round:
    """Everything the server saw and every bank object, for assertions and coalition attacks."""

    setup: RoundSetup
    server: ServerSecAgg
    banks: dict[str, BankSecAgg]
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> bank -> message bytes
    aggregate: SecureAggregate | None = None


def start_round(
    identities: list[Identity], pins: ConsortiumPins, key: BfvKey, n_elements: int, *, round: int = 1, **setup_kw
) -> Round:
    setup = ServerSecAgg.make_setup(
        job_id=JOB,
        round=round,
        participants=[i.bank_id for i in identities],
        n_elements=n_elements,
        key=key,
        **setup_kw,
    )
    banks = {i.bank_id: BankSecAgg(i, pins) for i in identities}
    return Round(setup=setup, server=ServerSecAgg(setup, pins, key), banks=banks)


def run_round(
    r: Round,
    updates: dict,
    weights: dict,
    key: BfvKey,
    *,
    drop_before_shares: tuple[str, ...] = (),
    drop_before_input: tuple[str, ...] = (),
    drop_before_consent: tuple[str, ...] = (),
    drop_before_unmask: tuple[str, ...] = (),
    hooks: dict[str, Hook] | None = None,
    skip_consent: bool = False,
) -> SecureAggregate:
    """Run all stages through bytes (as Flower would carry them); hooks[stage] may rewrite replies.
    skip_consent: no consent stage when nobody dropped (ServerSecAgg.orders_without_consent)."""
    hooks = hooks or {}

    def deliver(stage: str, replies: dict[str, Any]) -> dict[str, Any]:
        replies = {b: m.to_bytes() for b, m in replies.items()}
        replies = hooks.get(stage, lambda x: x)(replies)
        r.seen[stage] = replies
        return replies

    adv = deliver("advertise", {b: bank.advertise(r.setup) for b, bank in r.banks.items()})
    reqs = r.server.receive_advertisements(adv)
    replies = {b: r.banks[b].share_keys(q) for b, q in reqs.items() if b not in drop_before_shares}
    reqs = r.server.receive_shares(deliver("share_keys", replies))
    replies = {
        b: r.banks[b].masked_input(q, updates[b], weights[b], key)
        for b, q in reqs.items()
        if b not in drop_before_input
    }
    reqs = r.server.receive_masked_inputs(deliver("masked_input", replies))
    r.seen["unmask_requests"] = {b: q.to_bytes() for b, q in reqs.items()}
    orders = r.server.orders_without_consent() if skip_consent else None  # as fl_server does
    if orders is None:
        replies = {b: r.banks[b].consent(q) for b, q in reqs.items() if b not in drop_before_consent}
        orders = r.server.receive_consents(deliver("consistency", replies))
    replies = {b: r.banks[b].unmask(q) for b, q in orders.items() if b not in drop_before_unmask}
    r.aggregate = SecureAggregate.from_bytes(r.server.receive_unmask(deliver("unmask", replies)).to_bytes())
    return r.aggregate


def through_masked_input(r, updates, weights, key, *, skip=()) -> dict:
    """Advertise, share keys and masked input for every bank of round `r` (but `skip`): the server's
    unmask requests, one per survivor."""
    reqs = r.server.receive_advertisements({b: bank.advertise(r.setup) for b, bank in r.banks.items()})
    reqs = r.server.receive_shares({b: r.banks[b].share_keys(q) for b, q in reqs.items()})
    return r.server.receive_masked_inputs(
        {b: r.banks[b].masked_input(q, updates[b], weights[b], key) for b, q in reqs.items() if b not in skip}
    )


def view_without(honest, bank: str):
    """The server's split-view lie: the honest unmask request with `bank` moved from survivors to dropped
    (its mask key would be released while its masked input is in the sum)."""
    return dataclasses.replace(
        honest,
        survivors=tuple(b for b in honest.survivors if b != bank),
        dropped=(bank,),
        receipts=tuple(x for x in honest.receipts if x.bank_id != bank),
    )


def split_views(identities, bfv_public, n_elements: int):
    """Five banks after masked input (t = consent quorum = 4): the round, the identities, the honest
    unmask request of bank0 (everyone survived) and the lie of a split-view attack (bank3 dropped)."""
    from fedmoe.crypto.secagg.common import consent_quorum

    ids, pins = identities
    r = start_round(ids[:5], pins, bfv_public, n_elements)
    updates, weights = make_updates(list(r.banks), n_elements)
    honest = through_masked_input(r, updates, weights, bfv_public)["bank0"]
    assert consent_quorum(r.setup) == 4
    return r, ids, honest, view_without(honest, "bank3")
