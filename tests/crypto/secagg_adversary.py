"""A malicious server with one colluding bank, played against real `BankSecAgg` objects.

The server relays (or withholds) every message, hands each bank whatever sender list, view or order
it likes, and holds everything one colluding bank has: its round secrets, the shares it holds, its
identity key (so it signs any consent or receipt the colluder could) and the job's BFV secret key
(every bank holds it). What it may not do is forge an honest bank's signature.

`Table` is one round dealt up to the shares (advertise and share keys run once, for real); the
tests then branch it: `masked(...)` runs the masked-input stage of a *copy* of a bank under a
chosen sender list and set of withheld shares, `consent(...)`/`unmask(...)` ask a copy for a view.
`Loot` is what the coalition holds; `exposed(...)` says whether it has, for an honest bank V, V's
self-mask seed and, for every honest bank V masked with, that pair's mask key (the invariant of
docs/secagg.md, "Release rules"), and `open_victim(...)` then really strips V's masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import ConsortiumPins, Identity
from fedmoe.crypto.secagg import messages as m
from fedmoe.crypto.secagg.bank import BankSecAgg
from fedmoe.crypto.secagg.bfv import BfvKey
from fedmoe.crypto.secagg.bfv_secret import decrypt_residues
from fedmoe.crypto.secagg.common import pair_mask, pair_seed, self_mask
from fedmoe.crypto.secagg.params import add_mod, dequantize, neighbourhood, sub_mod
from fedmoe.crypto.secagg.primitives import shamir_combine
from fedmoe.crypto.secagg.server import ServerSecAgg

JOB = "job-adversary"


class MemoPins(ConsortiumPins):
    """The same pins, each (bank, data, signature) verified once: Ed25519 verification is a pure
    function of them, and the exploration asks the same question thousands of times."""

    def verify(self, bank_id: str, data: bytes, signature: bytes) -> None:
        memo = self.__dict__.setdefault("_memo", {})
        key = (bank_id, bytes(data), bytes(signature))
        if key not in memo:
            try:
                super().verify(bank_id, data, signature)
                memo[key] = None
            except CryptoError as err:
                memo[key] = err
        if memo[key] is not None:
            raise memo[key]


def copy_bank(bank: BankSecAgg) -> BankSecAgg:
    """An independent copy for one branch of the server's choices (the stages mutate only these fields)."""
    return dataclasses.replace(
        bank, released=dict(bank.released), held=dict(bank.held), complaints=list(bank.complaints), timings={}
    )


@dataclass
class Table:
    """One round after advertise and share keys (every share dealt, none relayed yet)."""

    setup: m.RoundSetup
    banks: dict[str, BankSecAgg]
    colluder: str
    key: BfvKey
    identities: dict[str, Identity]
    replies: dict[str, m.ShareKeysReply]
    updates: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def ids(self) -> tuple[str, ...]:
        return self.setup.participants

    @property
    def honest(self) -> tuple[str, ...]:
        return tuple(b for b in self.ids if b != self.colluder)

    @property
    def t(self) -> int:
        return self.setup.threshold

    def neighbours(self, bank: str) -> tuple[str, ...]:
        s = self.setup
        return neighbourhood(bank, s.participants, job_id=s.job_id, round=s.round, k=s.neighbours_k)

    def masked_request(
        self, bank: str, senders: Iterable[str], withheld: set[tuple[str, str]] = frozenset()
    ) -> m.MaskedInputRequest:
        """`bank`'s masked-input request: the given sender list, the shares of those senders addressed
        to it except the withheld (dealer, holder) pairs."""
        senders = tuple(sorted(senders))
        shares = tuple(
            s for d in senders for s in self.replies[d].shares if s.recipient == bank and (d, bank) not in withheld
        )
        return m.MaskedInputRequest(job_id=self.setup.job_id, round=self.setup.round, senders=senders, shares=shares)

    def masked(
        self, bank: str, senders: Iterable[str], withheld: set[tuple[str, str]] = frozenset()
    ) -> tuple[BankSecAgg, m.MaskedInput | None]:
        """A copy of `bank` after its masked-input stage (None when it refuses the request)."""
        copy = copy_bank(self.banks[bank])
        try:
            out = copy.masked_input(self.masked_request(bank, senders, withheld), self.updates[bank], 1.0, self.key)
        except CryptoError:
            return copy, None
        return copy, out

    def consents(self, view: m.UnmaskRequest, signers: Iterable[str]) -> tuple[m.UnmaskConsent, ...]:
        """The colluder's consent, signed with its own key (it signs whatever the server asks)."""
        return tuple(
            m.UnmaskConsent.signed(
                self.identities[b], bank_id=b, job_id=view.job_id, round=view.round, view_sha256=view.view_sha256()
            )
            for b in signers
        )


def deal(
    identities: list[Identity],
    pins: ConsortiumPins,
    key: BfvKey,
    *,
    colluder: str,
    n_elements: int = 4,
    threshold: int | None = None,
    neighbours_k: int = 0,
    min_banks: int = 3,
    seed: int = 0,
) -> Table:
    setup = ServerSecAgg.make_setup(
        job_id=JOB,
        round=1,
        participants=[i.bank_id for i in identities],
        n_elements=n_elements,
        key=key,
        min_banks=min_banks,
        neighbours_k=neighbours_k,
        threshold=threshold,
    )
    banks = {i.bank_id: BankSecAgg(i, pins) for i in identities}
    ads = tuple(banks[b].advertise(setup) for b in setup.participants)
    request = m.ShareKeysRequest(setup=setup, advertisements=ads)
    replies = {b: banks[b].share_keys(request) for b in setup.participants}
    rng = np.random.default_rng(seed)
    updates = {b: (rng.standard_normal(n_elements) * 1e-2).astype(np.float32) for b in setup.participants}
    return Table(setup, banks, colluder, key, {i.bank_id: i for i in identities}, replies, updates)


def view(
    table: Table, survivors: Iterable[str], dropped: Iterable[str], receipts: dict[str, m.Receipt]
) -> m.UnmaskRequest:
    survivors = tuple(sorted(survivors))
    return m.UnmaskRequest(
        job_id=table.setup.job_id,
        round=table.setup.round,
        survivors=survivors,
        dropped=tuple(sorted(dropped)),
        receipts=tuple(receipts[b] for b in survivors if b in receipts),
    )


@dataclass
class Loot:
    """The shares the coalition holds: (dealer, kind) -> {x: y}; plus the colluder's own secrets."""

    table: Table
    colluder_bank: BankSecAgg
    shares: dict[tuple[str, str], dict[int, bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for dealer, held in self.colluder_bank.held.items():  # the colluder's shares of everyone
            self.add(dealer, "self_mask", held.x, held.self_mask)
            self.add(dealer, "mask_key", held.x, held.mask_key)

    def add(self, dealer: str, kind: str, x: int, y: bytes) -> None:
        self.shares.setdefault((dealer, kind), {})[x] = y

    def take(self, reply: m.UnmaskReply) -> None:
        for s in reply.shares:
            self.add(s.dealer, s.kind, s.x, s.y)

    def secret(self, dealer: str, kind: str) -> bytes | None:
        got = self.shares.get((dealer, kind), {})
        if len(got) < self.table.t:
            return None
        return shamir_combine(dict(sorted(got.items())[: self.table.t]))

    def knows(self, dealer: str, kind: str) -> bool:
        return len(self.shares.get((dealer, kind), {})) >= self.table.t

    def exposed(self, victim: BankSecAgg) -> bool:
        """The invariant's negation for `victim` (after its masked input): its self-mask seed, and for
        every honest bank it masked with, that bank's or its own mask key."""
        if victim.stage == "shared" or not self.knows(victim.bank_id, "self_mask"):
            return False
        return all(
            self.knows(victim.bank_id, "mask_key") or self.knows(peer, "mask_key")
            for peer in victim.masked_with
            if peer != self.table.colluder
        )


def open_victim(loot: Loot, victim: BankSecAgg, masked: m.MaskedInput, bfv_secret) -> np.ndarray:
    """Strip every mask from the victim's individual ciphertext with what the coalition holds."""
    table, setup = loot.table, loot.table.setup
    t, n = setup.params.plain_modulus, setup.n_elements + 1
    _, residues = decrypt_residues(masked.bundle, bfv_secret)
    seed = loot.secret(victim.bank_id, "self_mask")
    assert seed is not None
    v = victim.bank_id
    residues = sub_mod(residues, self_mask(seed, n, t, job_id=setup.job_id, round=setup.round, bank_id=v), t)
    own_key = loot.secret(v, "mask_key")
    colluder = loot.colluder_bank
    for peer in victim.masked_with:
        if peer == table.colluder:
            pseed = pair_seed(colluder.mask_sk, colluder.peers[v].mask_pk, job_id=JOB, round=1, a=peer, b=v)
        elif own_key is not None:
            pk = next(a.mask_pk for a in _adverts(table) if a.bank_id == peer)
            pseed = pair_seed(own_key, pk, job_id=JOB, round=1, a=v, b=peer)
        else:
            peer_key = loot.secret(peer, "mask_key")
            assert peer_key is not None
            pk = next(a.mask_pk for a in _adverts(table) if a.bank_id == v)
            pseed = pair_seed(peer_key, pk, job_id=JOB, round=1, a=peer, b=v)
        mask = pair_mask(pseed, n, t)
        residues = sub_mod(residues, mask, t) if v < peer else add_mod(residues, mask, t)
    return dequantize(residues, setup.params)[:-1]


def _adverts(table: Table) -> list[m.KeyAdvertisement]:
    return [b.advertisement for b in table.banks.values()]
