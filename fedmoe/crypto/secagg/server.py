"""Server side of secure aggregation: relay, add BFV ciphertexts, remove the residual masks.

Imports only public-side code: `fedmoe.crypto.secagg.bfv` (public key: encrypt, add), the messages, the
parameters and the primitives. It never imports `fedmoe.crypto.secagg.bfv_secret` or `fedmoe.crypto.secagg.bank`
(a test checks this) and refuses a BFV context that holds a secret key. What it learns: who took
part and dropped at each stage, the banks' signed ephemeral public keys and receipts, and the
self-mask seeds of survivors and mask keys of dropped banks (both random, needed to unmask).
It never sees a plaintext update or sum: the masked inputs and the sum stay BFV ciphertexts.

One `ServerSecAgg` per round; each `receive_*` method takes the banks' replies of one stage (bank id
-> typed message or its bytes; a selected bank missing from the mapping has dropped) and returns
the next stage's request per bank:

  ServerSecAgg.make_setup(...)                         -> RoundSetup (send to the participants)
  receive_advertisements({bank: KeyAdvertisement})     -> {bank: ShareKeysRequest}
  receive_shares({bank: ShareKeysReply})               -> {bank: MaskedInputRequest}
  receive_masked_inputs({bank: MaskedInput})           -> {bank: UnmaskRequest}   (adds ciphertexts)
  receive_consents({bank: UnmaskConsent})              -> {bank: UnmaskOrder}     (consistency check)
  receive_unmask({bank: UnmaskReply})                  -> SecureAggregate         (removes masks)
Any stage raises SecAggAbort (reason "too_few", "commitment") when the round cannot complete;
`exclusions` lists every bank left out, with the stage and a typed reason.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import TypeVar

import numpy as np
import tenseal as ts

from fedmoe.crypto.errors import REJECT_REASONS, CryptoError
from fedmoe.crypto.identity import ConsortiumPins
from fedmoe.crypto.secagg import messages
from fedmoe.crypto.secagg.bfv import BfvKey, load_bfv_chunks, parse_bfv_bundle, serialize_sum
from fedmoe.crypto.secagg.common import (
    check_setup,
    complete_graph,
    consent_quorum,
    reconstruct,
    residual_masks,
    verify_advertisement,
    verify_receipt,
)
from fedmoe.crypto.secagg.params import SecAggParams, centered, default_threshold, neighbourhood

log = logging.getLogger(__name__)
M = TypeVar("M", bound=messages.Message)


class ServerSecAgg:
    """The server's state in one round. See the module docstring for the stage methods."""

    def __init__(self, setup: messages.RoundSetup, pins: ConsortiumPins, key: BfvKey) -> None:
        if key.is_private():
            raise CryptoError("ServerSecAgg: the BFV context holds a secret key; the server must load the public one")
        if key.key_id != setup.bfv_key_id or key.params != setup.params:
            raise CryptoError(f"ServerSecAgg: public key {key.key_id} / params differ from the round setup's")
        for b in setup.participants:  # the same policy the banks apply (server-side colluding = 1)
            check_setup(setup, b, pins, min_banks=2, colluding=1)
        self.setup, self.pins, self.key = setup, pins, key
        self.exclusions: list[messages.Exclusion] = []
        self.timings: dict[str, float] = {}
        self.adverts: dict[str, messages.KeyAdvertisement] = {}
        self.senders: tuple[str, ...] = ()
        self.receipts: dict[str, messages.Receipt] = {}
        self.survivors: tuple[str, ...] = ()
        self.dropped: tuple[str, ...] = ()
        self.request: messages.UnmaskRequest | None = None
        self.consenting: tuple[str, ...] = ()
        # kept for accountability (fedmoe.crypto.secagg.accountability): what the sum was unmasked from
        self.inputs: dict[str, messages.MaskedInput] = {}
        self.unmask_replies: dict[str, messages.UnmaskReply] = {}
        self.aggregate: messages.SecureAggregate | None = None
        self._sum: list[ts.BFVVector] | None = None
        self._stage: messages.Stage = "advertise"

    @staticmethod
    def make_setup(
        *,
        job_id: str,
        round: int,
        participants: list[str] | tuple[str, ...],
        n_elements: int,
        key: BfvKey,
        layout_hash: str = "",
        min_banks: int = 2,
        neighbours_k: int = 0,
        threshold: int | None = None,
        params: SecAggParams | None = None,
    ) -> messages.RoundSetup:
        """The round setup the server proposes (banks check it against their own policy).

        Args:
            job_id, round: bind every key, share and signature of the round.
            participants: the selected bank ids (sorted and de-duplicated here).
            n_elements: update length (trainable view size).
            key: the job's BFV public key (its id and parameters go into the setup).
            layout_hash: the trainable view's layout hash, signed along with the setup.
            min_banks: fewest contributors a sum may have.
            neighbours_k: 0 = everyone neighbours everyone (the default: sums hold <= max_banks = 1024
                banks); an even k for k-regular neighbourhoods in larger federations.
            threshold: Shamir threshold; default max(2, ceil(2h/3), floor((h+1)/2) + 1) for h holders.
            params: defaults to the key's parameters.
        """
        ids = tuple(sorted(set(participants)))
        holders = len(neighbourhood(ids[0], ids, job_id=job_id, round=round, k=neighbours_k)) + 1
        return messages.RoundSetup(
            job_id=job_id,
            round=round,
            participants=ids,
            threshold=default_threshold(holders) if threshold is None else threshold,
            neighbours_k=neighbours_k,
            n_elements=n_elements,
            layout_hash=layout_hash,
            min_banks=min_banks,
            bfv_key_id=key.key_id,
            params=params or key.params,
        )

    # -------------------------------------------------------------------------------------------

    def receive_advertisements(
        self, adverts: Mapping[str, messages.KeyAdvertisement | bytes]
    ) -> dict[str, messages.ShareKeysRequest]:
        self._enter("advertise")
        for bank in self.setup.participants:
            adv = self._parse(bank, adverts, messages.KeyAdvertisement, "advertise")
            if adv is None:
                continue
            try:
                _check_sender(bank, adv.bank_id, "advertisement names")
                verify_advertisement(adv, self.setup, self.pins)
            except CryptoError as e:
                self._exclude(bank, "advertise", e)
                continue
            self.adverts[bank] = adv
        self._need(len(self.adverts), "advertise", "valid advertisements")
        request = messages.ShareKeysRequest(
            setup=self.setup, advertisements=tuple(self.adverts[b] for b in sorted(self.adverts))
        )
        self._stage = "share_keys"
        return dict.fromkeys(sorted(self.adverts), request)

    def receive_shares(
        self, replies: Mapping[str, messages.ShareKeysReply | bytes]
    ) -> dict[str, messages.MaskedInputRequest]:
        self._enter("share_keys")
        inbox: dict[str, list[messages.EncryptedShare]] = {b: [] for b in self.adverts}
        senders = []
        for bank in sorted(self.adverts):
            reply = self._parse(bank, replies, messages.ShareKeysReply, "share_keys")
            if reply is None:
                continue
            try:
                _check_sender(bank, reply.bank_id, "shares name")
                self._check_round(reply.job_id, reply.round)
                targets = [s.recipient for s in reply.shares]
                if any(s.dealer != bank or s.recipient not in self.adverts for s in reply.shares) or len(
                    set(targets)
                ) != len(targets):
                    raise CryptoError("shares with another dealer, an unknown or a repeated recipient", reason="share")
            except CryptoError as e:
                self._exclude(bank, "share_keys", e)
                continue
            senders.append(bank)
            for s in reply.shares:
                inbox[s.recipient].append(s)
        self.senders = tuple(senders)
        self._need(len(self.senders), "share_keys", "banks that sent shares")
        self._stage = "masked_input"
        return {
            b: messages.MaskedInputRequest(
                job_id=self.setup.job_id,
                round=self.setup.round,
                senders=self.senders,
                shares=tuple(s for s in inbox[b] if s.dealer in self.senders),
            )
            for b in self.senders
        }

    def receive_masked_inputs(
        self, inputs: Mapping[str, messages.MaskedInput | bytes]
    ) -> dict[str, messages.UnmaskRequest]:
        """Validate masked inputs, settle complaints, fix survivors and dropped banks, add survivors' inputs."""
        self._enter("masked_input")
        started = time.perf_counter()
        vecs: dict[str, list[ts.BFVVector]] = {}
        for bank in self.senders:
            msg = self._parse(bank, inputs, messages.MaskedInput, "masked_input")
            if msg is None:
                continue
            try:
                vecs[bank] = self._check_masked_input(bank, msg)
            except CryptoError as e:
                self._exclude(bank, "masked_input", e)
                continue
            self.receipts[bank] = msg.receipt
            self.inputs[bank] = msg

        # A complaint excludes the accused: its input is not added and it is unmasked as dropped, so
        # the pairwise masks of every remaining pair are on both sides (or on neither).
        alive = set(vecs)
        for bank in sorted(vecs):
            for c in self.receipts[bank].complaints:
                if c.dealer in alive and c.dealer != bank:
                    alive.discard(c.dealer)
                    reason = c.reason if c.reason in REJECT_REASONS else "malformed"
                    self._exclude(
                        c.dealer, "masked_input", CryptoError(f"{bank!r} complains: {c.detail}", reason=reason)
                    )
        self._settle_masking(alive)
        self.survivors = tuple(sorted(alive))
        self.dropped = tuple(b for b in self.senders if b not in alive)
        self._need(len(self.survivors), "masked_input", "survivors with masked input")

        t_add = time.perf_counter()
        acc = None
        for bank in self.survivors:
            if acc is None:
                acc = vecs[bank]
            else:
                for total, v in zip(acc, vecs[bank], strict=True):
                    total.add_(v)
        self._sum = acc
        self.timings["validate_inputs"] = t_add - started
        self.timings["adds"] = time.perf_counter() - t_add
        self._stage = "consistency"
        self.request = messages.UnmaskRequest(
            job_id=self.setup.job_id,
            round=self.setup.round,
            survivors=self.survivors,
            dropped=self.dropped,
            receipts=tuple(self.receipts[b] for b in self.survivors),
        )
        return dict.fromkeys(self.survivors, self.request)

    def _settle_masking(self, alive: set[str]) -> None:
        """Leave out (as dropped) what the banks' view rules V6/V7 refuse (docs/secagg.md, "Release rules"):
        both banks of a neighbouring pair that did not mask with each other per their signed receipts,
        then, until none is left, any survivor with fewer than two surviving neighbours (k-regular
        neighbourhoods only: with everyone neighbouring everyone the survivor count already ensures it)."""
        s = self.setup

        def near(b: str) -> list[str]:
            return [
                w
                for w in neighbourhood(b, s.participants, job_id=s.job_id, round=s.round, k=s.neighbours_k)
                if w in alive
            ]

        changed = True
        while changed:
            changed = False
            for u in sorted(alive):
                for v in near(u):
                    mu, mv = self.receipts[u].masked_with, self.receipts[v].masked_with
                    if u < v and u in alive and v in alive and not (v in mu and u in mv):
                        for b in (u, v):
                            alive.discard(b)
                            self._exclude(
                                b,
                                "masked_input",
                                CryptoError(f"{u!r}/{v!r} did not mask with each other", reason="inconsistent"),
                            )
                        changed = True
            for u in sorted(alive):
                if len(near(u)) < 2:
                    alive.discard(u)
                    self._exclude(
                        u,
                        "masked_input",
                        CryptoError(
                            "fewer than two surviving neighbours: its input would be exposed", reason="too_few"
                        ),
                    )
                    changed = True

    def receive_consents(
        self, consents: Mapping[str, messages.UnmaskConsent | bytes]
    ) -> dict[str, messages.UnmaskOrder]:
        """Collect the survivors' signatures on the unmask view; send the order to those who signed."""
        self._enter("consistency")
        view = self.request.view_sha256()
        valid = []
        for bank in self.survivors:
            c = self._parse(bank, consents, messages.UnmaskConsent, "consistency", in_sum=True)
            if c is None:
                continue
            try:
                if c.bank_id != bank or c.view_sha256 != view:
                    raise CryptoError("consent names another bank or another view", reason="inconsistent")
                self._check_round(c.job_id, c.round)
                self.pins.verify(bank, c.signed_bytes(), c.signature)
            except CryptoError as e:
                self._exclude(bank, "consistency", e, in_sum=True)
                continue
            valid.append(c)
        quorum = consent_quorum(self.setup)
        if len(valid) < quorum:
            raise self._abort(f"consistency: {len(valid)} consents on the unmask view, need {quorum}", "too_few")
        self.consenting = tuple(c.bank_id for c in valid)
        self._stage = "unmask"
        order = messages.UnmaskOrder(request=self.request, consents=tuple(valid))
        return dict.fromkeys(self.consenting, order)

    def orders_without_consent(self) -> dict[str, messages.UnmaskOrder] | None:
        """When every participant sent shares and survived: the unmask order with no consents, skipping stage 3.

        Such a view asks only for self-mask shares, and each bank checks it as it would before
        consenting and takes it as its one view of the round (BankSecAgg.unmask, rule CF), so a split
        view still needs a consent quorum for any mask key. None when a participant is missing or
        dropped, or under k-regular neighbourhoods: consents needed.
        """
        self._enter("consistency")
        if self.dropped or set(self.survivors) != set(self.setup.participants) or not complete_graph(self.setup):
            return None  # k-regular: the quorum keeps banks on one view; any gap: consents (rule CF)
        self.consenting = self.survivors
        self._stage = "unmask"
        return dict.fromkeys(self.survivors, messages.UnmaskOrder(request=self.request, consents=()))

    def receive_unmask(self, replies: Mapping[str, messages.UnmaskReply | bytes]) -> messages.SecureAggregate:
        """Reconstruct survivors' self-mask seeds and dropped banks' mask keys, remove their masks from the sum.

        Raises:
            SecAggAbort: reason "too_few" (a secret with fewer than t valid shares) or "commitment"
                (a reconstructed secret that its dealer's signed advertisement does not match).
        """
        self._enter("unmask")
        started = time.perf_counter()
        setup = self.setup
        want = {b: "self_mask" for b in self.survivors} | {b: "mask_key" for b in self.dropped}
        shares: dict[str, dict[int, bytes]] = {b: {} for b in want}
        responders = 0
        for bank in self.consenting:
            reply = self._parse(bank, replies, messages.UnmaskReply, "unmask", in_sum=True)
            if reply is None:
                continue
            try:
                accepted = self._check_unmask_reply(bank, reply, want)
            except CryptoError as e:
                self._exclude(bank, "unmask", e, in_sum=True)
                continue
            responders += 1
            self.unmask_replies[bank] = reply
            for s in accepted:
                shares[s.dealer][s.x] = s.y
        self._need(responders, "unmask", "banks that answered the unmask request")

        self_seeds, mask_keys = {}, {}
        for dealer, kind in want.items():
            if kind == "mask_key" and not any(dealer in self.receipts[s].masked_with for s in self.survivors):
                continue  # nobody masked with it: nothing to remove
            try:
                secret = reconstruct(setup, dealer, kind, shares[dealer], self.adverts[dealer])
            except CryptoError as e:
                if e.reason == "commitment":
                    self._exclude(
                        dealer, "unmask", CryptoError(f"dealt inconsistent {kind} shares", reason="commitment")
                    )
                raise self._abort(f"{e}; nothing unmasked", e.reason or "too_few") from None
            (self_seeds if kind == "self_mask" else mask_keys)[dealer] = secret
        masked_with = {s: self.receipts[s].masked_with for s in self.survivors}
        residual = residual_masks(setup, self.survivors, masked_with, self.adverts, self_seeds, mask_keys)
        t, n = setup.params.plain_modulus, setup.n_elements + 1
        self.unmasked = {"self_mask": self_seeds, "mask_key": mask_keys}
        t_res = time.perf_counter()
        assert self._sum is not None
        minus = centered((np.uint64(t) - residual) % np.uint64(t), t)  # (n,) -residual, as TenSEAL takes it
        slots = setup.params.slots
        for i, vec in enumerate(self._sum):
            vec.add_(minus[i * slots : i * slots + vec.size()].tolist())  # plaintext add: no extra noise
        bundle = serialize_sum(self._sum, self.key, job_id=setup.job_id, round=setup.round, n_values=n)
        self.timings["unmasking"] = time.perf_counter() - started
        self.timings["residual_masks"] = t_res - started
        self._stage = "aggregate"
        log.info(
            "secagg job %s round %d: %d contributors, %d dropped, %d exclusion(s)",
            setup.job_id,
            setup.round,
            len(self.survivors),
            len(self.dropped),
            len(self.exclusions),
        )
        self.aggregate = messages.SecureAggregate(
            job_id=setup.job_id,
            round=setup.round,
            contributors=self.survivors,
            receipts=tuple(self.receipts[b] for b in self.survivors),
            exclusions=tuple(self.exclusions),
            bundle=bundle,
        )
        return self.aggregate

    def evidence(self) -> messages.QuarantineEvidence:
        """Everything signed this round's sum was unmasked from, for banks to check a quarantine
        (fedmoe.crypto.secagg.accountability): the setup, the advertisements, the survivors' masked
        inputs, the unmask replies and the aggregate."""
        if self.aggregate is None:
            raise CryptoError("evidence: this round has no aggregate", reason="inconsistent")
        return messages.QuarantineEvidence(
            setup=self.setup,
            advertisements=tuple(self.adverts[b] for b in sorted(self.adverts)),
            inputs=tuple(self.inputs[b] for b in self.survivors),
            unmask=tuple(self.unmask_replies[b] for b in sorted(self.unmask_replies)),
            aggregate=self.aggregate,
        )

    # -------------------------------------------------------------------------------------------

    def _check_masked_input(self, bank: str, msg: messages.MaskedInput) -> list[ts.BFVVector]:
        r = msg.receipt
        _check_sender(bank, r.bank_id, "receipt names")
        verify_receipt(r, self.setup, self.pins)
        if hashlib.sha256(msg.bundle).digest() != r.bundle_sha256:
            raise CryptoError("bundle SHA-256 differs from the signed receipt", reason="hash")
        nbrs = neighbourhood(
            bank, self.setup.participants, job_id=self.setup.job_id, round=self.setup.round, k=self.setup.neighbours_k
        )
        if not set(r.masked_with) <= set(nbrs) & set(self.senders):
            raise CryptoError("masked with banks outside its neighbours among the senders", reason="inconsistent")
        header, chunks = parse_bfv_bundle(msg.bundle)
        expect = ("masked_input", self.setup.job_id, self.setup.round, bank, self.setup.n_elements + 1)
        got = (header.kind, header.job_id, header.round, header.bank_id, header.n_values)
        if got != expect:
            raise CryptoError(f"bundle header {got} expected {expect}", reason="layout")
        return load_bfv_chunks(self.key, header, chunks)

    def _check_unmask_reply(
        self, bank: str, reply: messages.UnmaskReply, want: dict[str, str]
    ) -> list[messages.RevealedShare]:
        _check_sender(bank, reply.bank_id, "unmask reply names")
        self._check_round(reply.job_id, reply.round)
        x = 1 + self.setup.participants.index(bank)
        for s in reply.shares:
            if s.holder != bank or s.x != x or want.get(s.dealer) != s.kind:
                raise CryptoError(
                    f"share of {s.dealer!r} ({s.kind}) not requested or not this holder's", reason="share"
                )
            payload = messages.share_signature_payload(
                job_id=self.setup.job_id,
                round=self.setup.round,
                dealer=s.dealer,
                holder=bank,
                kind=s.kind,
                x=s.x,
                y=s.y,
            )
            try:
                self.pins.verify(s.dealer, payload, s.dealer_signature)
            except CryptoError as e:
                raise CryptoError(f"share of {s.dealer!r}: dealer signature fails", reason="share") from e
        return list(reply.shares)

    def _parse(
        self, bank: str, replies: Mapping[str, M | bytes], cls: type[M], stage: messages.Stage, *, in_sum: bool = False
    ) -> M | None:
        if bank not in replies:
            self._exclude(bank, stage, CryptoError(f"no {cls.__name__} received", reason="dropped"), in_sum=in_sum)
            return None
        msg = replies[bank]
        if isinstance(msg, (bytes, bytearray, memoryview)):
            try:
                return cls.from_bytes(bytes(msg))
            except CryptoError as e:
                self._exclude(bank, stage, e, in_sum=in_sum)
                return None
        if not isinstance(msg, cls):
            self._exclude(bank, stage, CryptoError(f"expected {cls.__name__}", reason="malformed"), in_sum=in_sum)
            return None
        return msg

    def _exclude(self, bank: str, stage: messages.Stage, err: CryptoError, *, in_sum: bool = False) -> None:
        """Record a bank left out of a stage (in_sum: its input still counts, only its shares are missing)."""
        reason = err.reason or "malformed"
        note = " (its input stays in the sum)" if in_sum else ""
        log.warning("secagg round %d: bank %r out at %s (%s)%s: %s", self.setup.round, bank, stage, reason, note, err)
        self.exclusions.append(
            messages.Exclusion(bank_id=bank, stage=stage, reason=reason, message=f"{err}{note}"[:300])
        )

    def _need(self, have: int, stage: messages.Stage, what: str) -> None:
        need = max(self.setup.threshold, self.setup.min_banks)
        if have < need:
            raise self._abort(f"{stage}: {have} {what}, need {need}; nothing is unmasked", "too_few")

    def _abort(self, message: str, reason: str) -> messages.SecAggAbort:
        log.error("secagg job %s round %d aborted: %s", self.setup.job_id, self.setup.round, message)
        self._stage = "setup"  # no further stage accepted
        return messages.SecAggAbort(message, reason=reason, exclusions=tuple(self.exclusions))  # type: ignore[arg-type]

    def _enter(self, stage: messages.Stage) -> None:
        if self._stage != stage:
            raise CryptoError(f"ServerSecAgg: stage {stage!r} called, expected {self._stage!r}", reason="inconsistent")

    def _check_round(self, job_id: str, round: int) -> None:
        if (job_id, round) != (self.setup.job_id, self.setup.round):
            raise CryptoError(f"message for job {job_id!r} round {round}", reason="replay")


def _check_sender(bank: str, named: str, what: str) -> None:
    """A message must name the bank that sent it (else reason "bank_id")."""
    if named != bank:
        raise CryptoError(f"{what} {named!r}, sent by {bank!r}", reason="bank_id")
