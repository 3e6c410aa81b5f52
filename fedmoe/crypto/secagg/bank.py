"""Bank side of secure aggregation (Bonawitz et al., CCS 2017, with Bell et al., CCS 2020 neighbourhoods).

One `BankSecAgg` per bank and round; each stage method takes the server's typed request and returns
the bank's typed reply (one Flower message exchange each):

  advertise(setup)                         -> KeyAdvertisement   fresh X25519 keys, signed
  share_keys(ShareKeysRequest)             -> ShareKeysReply     Shamir shares of the mask key and
                                                                 self-mask seed, encrypted per holder
  masked_input(MaskedInputRequest, delta, w, key) -> MaskedInput quantize [w*delta, w], add self and
                                                                 pairwise masks mod t, BFV-encrypt
  consent(UnmaskRequest)                   -> UnmaskConsent      signs the one survivor/dropped view
                                                                 it accepts (consistency check)
  unmask(UnmaskOrder)                      -> UnmaskReply        with a quorum of consents on that
                                                                 view: self-mask shares of
                                                                 survivors, mask-key shares of
                                                                 dropped banks
and, once the server has the sum, `open_aggregate` decrypts and dequantizes it.

A bank's executor may restart between two messages, so the per-round secrets survive between stages
through `state_dict()` / `from_state()` (JSON with secrets in it: store it 0600 in the bank's state
dir, e.g. fedmoe.protocol.files.atomic_write_json(path, state, mode=0o600), and delete it after the round).

Every release rule (A1-A4, S1-S4, M1-M3, V1-V8, U1-U3, CF) is written down with the invariant it
keeps in docs/secagg.md, "Release rules": for no honest bank V can the server plus one bank hold
V's self-mask seed and, for every honest bank V masked with, that pair's mask key. Never released,
whatever the server asks: both shares of one peer in one round, its own mask-key share, any share
under a second view of the round, any share under a view in which two neighbouring survivors did
not mask with each other (per their signed receipts) or with fewer survivors than its floor, any
mask-key share (or any share at all under k-regular neighbourhoods) without a quorum of banks'
signatures on the same view. Without consents a bank releases only self-mask shares, only when
everyone neighbours everyone and every participant survived (`unmask`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmoe.crypto.envelope import canonical_json
from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import ConsortiumPins, Identity
from fedmoe.crypto.secagg import messages
from fedmoe.crypto.secagg.accountability import Check, evidence_digest, verify_quarantine
from fedmoe.crypto.secagg.bfv import BfvKey, encrypt_residues
from fedmoe.crypto.secagg.bfv_secret import decrypt_residues
from fedmoe.crypto.secagg.common import (
    check_key,
    check_setup,
    complete_graph,
    consent_quorum,
    pair_context,
    pair_mask,
    pair_seed,
    self_mask,
    share_ad,
    verify_advertisement,
    verify_receipt,
)
from fedmoe.crypto.secagg.params import BANK_FLOOR, add_mod, dequantize, neighbourhood, quantize, sub_mod
from fedmoe.crypto.secagg.primitives import (
    KEY_BYTES,
    derive_key,
    new_x25519,
    open_sealed,
    seal,
    shamir_split,
)

log = logging.getLogger(__name__)


@dataclass
class _Peer:
    share_pk: bytes
    mask_pk: bytes
    commitment: bytes


@dataclass
class _Held:
    """The two shares one dealer gave this bank, with the dealer's signature over each."""

    x: int
    self_mask: bytes
    self_mask_sig: bytes
    mask_key: bytes
    mask_key_sig: bytes


@dataclass
class _Plan:
    """What the masked-input stage will do (BankSecAgg._plan): computed before the bank trains."""

    held: dict[str, _Held] = field(default_factory=dict)
    complaints: list[messages.Complaint] = field(default_factory=list)
    masked_with: tuple[str, ...] = ()
    seeds: dict[str, bytes] = field(default_factory=dict)


@dataclass
class BankSecAgg:
    """One bank's state in one round of secure aggregation.

    Create it with `BankSecAgg(identity, pins)`, then call the stages in order.
    `min_banks` is the bank's own floor on contributors; `colluding` the number of colluding banks
    (besides the server) the threshold must resist.
    """

    identity: Identity
    pins: ConsortiumPins
    min_banks: int = BANK_FLOOR
    colluding: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    # per-round state (secrets: never logged; persisted via state_dict only)
    setup: messages.RoundSetup | None = None
    stage: str = "new"
    share_sk: bytes = b""
    mask_sk: bytes = b""
    self_seed: bytes = b""
    advertisement: messages.KeyAdvertisement | None = None
    peers: dict[str, _Peer] = field(default_factory=dict)
    held: dict[str, _Held] = field(default_factory=dict)
    complaints: list[messages.Complaint] = field(default_factory=list)
    senders: tuple[str, ...] = ()
    masked_with: tuple[str, ...] = ()
    unmask_digest: bytes = b""
    released: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.min_banks, int) or self.min_banks < BANK_FLOOR:
            raise CryptoError(
                f"bank {self.identity.bank_id!r}: min_banks {self.min_banks!r} is below {BANK_FLOOR}: with two "
                f"contributors the aggregate minus one's own update is the other's"
            )
        if not isinstance(self.colluding, int) or self.colluding < 1:
            raise CryptoError(f"bank {self.identity.bank_id!r}: colluding expected an int >= 1, got {self.colluding!r}")

    @property
    def bank_id(self) -> str:
        return self.identity.bank_id

    # -------------------------------------------------------------------------------------------
    # stage 0

    def advertise(self, setup: messages.RoundSetup, key: BfvKey | None = None) -> messages.KeyAdvertisement:
        """Check the round setup against this bank's policy, draw the round's keys, sign them.

        Args:
            setup: the server's proposal.
            key: this bank's BFV key; when given, the setup's key id and parameters must be its own
                (the federation always passes it).

        Raises:
            CryptoError: reason "inconsistent" (setup breaks policy), "key_id" (another BFV key or
            other parameters), or stage already past.
        """
        self._expect_stage("new")
        started = time.perf_counter()
        check_setup(setup, self.bank_id, self.pins, min_banks=self.min_banks, colluding=self.colluding)
        if key is not None:
            check_key(setup, key, self.bank_id, "advertise")
        self.setup = setup
        self.share_sk, share_pk = new_x25519()
        self.mask_sk, mask_pk = new_x25519()
        self.self_seed = secrets.token_bytes(KEY_BYTES)
        self.advertisement = messages.KeyAdvertisement.signed(
            self.identity,
            **self._ids(),
            setup_digest=setup.digest(),
            share_pk=share_pk,
            mask_pk=mask_pk,
            self_mask_commitment=messages.self_mask_commitment(**self._ids(), seed=self.self_seed),
        )
        self.stage = "advertised"
        self.timings["keys"] = time.perf_counter() - started
        return self.advertisement

    # -------------------------------------------------------------------------------------------
    # stage 1

    def share_keys(self, request: messages.ShareKeysRequest) -> messages.ShareKeysReply:
        """Verify the peers' advertisements, deal Shamir shares to the neighbours, encrypt each to its holder.

        Raises:
            CryptoError: reason "inconsistent" (another setup, or our own advertisement altered);
            SecAggAbort: reason "too_few" when fewer than t holders have valid advertisements.
        """
        self._expect_stage("advertised")
        started = time.perf_counter()
        setup = self._setup()
        if request.setup.digest() != setup.digest():
            raise CryptoError("share_keys: the server's setup differs from the one advertised", reason="inconsistent")
        mine = [a for a in request.advertisements if a.bank_id == self.bank_id]
        if len(mine) != 1 or mine[0] != self.advertisement:
            raise CryptoError("share_keys: our own advertisement is missing or altered", reason="inconsistent")
        seen: set[str] = set()
        for adv in request.advertisements:
            if adv.bank_id == self.bank_id:
                continue
            if adv.bank_id in seen:
                self._complain(adv.bank_id, "duplicate", "two advertisements")
                self.peers.pop(adv.bank_id, None)
                continue
            seen.add(adv.bank_id)
            try:
                verify_advertisement(adv, setup, self.pins)
            except CryptoError as e:
                self._complain(adv.bank_id, e.reason or "signature", str(e))
                continue
            self.peers[adv.bank_id] = _Peer(adv.share_pk, adv.mask_pk, adv.self_mask_commitment)

        neighbours = self._neighbours()
        holders = [b for b in neighbours if b in self.peers] + [self.bank_id]
        if len(holders) < setup.threshold:
            raise messages.SecAggAbort(
                f"share_keys(bank {self.bank_id!r}): {len(holders)} holders with valid keys, threshold "
                f"{setup.threshold}",
                reason="too_few",
            )
        xs = {b: 1 + setup.participants.index(b) for b in holders}
        self_shares = shamir_split(self.self_seed, xs.values(), setup.threshold)
        key_shares = shamir_split(self.mask_sk, xs.values(), setup.threshold)
        out = []
        for holder, x in xs.items():
            sigs = {
                kind: self.identity.sign(
                    messages.share_signature_payload(
                        job_id=setup.job_id, round=setup.round, dealer=self.bank_id, holder=holder, kind=kind, x=x, y=y
                    )
                )
                for kind, y in (("self_mask", self_shares[x]), ("mask_key", key_shares[x]))
            }
            held = _Held(x, self_shares[x], sigs["self_mask"], key_shares[x], sigs["mask_key"])
            if holder == self.bank_id:
                self.held[holder] = held
                continue
            key = derive_key(
                self.share_sk,
                self.peers[holder].share_pk,
                purpose="share-key",
                context=pair_context(setup.job_id, setup.round, self.bank_id, holder),
            )
            nonce, ct = seal(
                key, canonical_json(_held_to_json(held)), share_ad(setup.job_id, setup.round, self.bank_id, holder)
            )
            out.append(messages.EncryptedShare(dealer=self.bank_id, recipient=holder, nonce=nonce, ciphertext=ct))
        self.stage = "shared"
        self.timings["shares"] = time.perf_counter() - started
        return messages.ShareKeysReply(**self._ids(), shares=tuple(out))

    # -------------------------------------------------------------------------------------------
    # stage 2

    def check_masked_input(self, request: messages.MaskedInputRequest, key: BfvKey) -> None:
        """Everything `masked_input` checks before it masks, without changing this bank's state.

        Run before the bank trains (fedmoe/fl_client/secagg_bank.py), so that a request it would
        refuse costs it no privacy budget. A peer whose share or key fails is not a refusal: it
        becomes a complaint naming that peer (the peer is blamed, not this bank).

        Raises:
            CryptoError / SecAggAbort: as `masked_input` would, before training.
        """
        self._plan(request, key)

    def masked_input(
        self, request: messages.MaskedInputRequest, update: np.ndarray, weight: float, key: BfvKey
    ) -> messages.MaskedInput:
        """Decrypt and check the shares held for peers, then mask and encrypt [w * delta..., w].

        Args:
            request: the senders of stage 1 (U2) and the shares addressed to this bank.
            update: flat float32 delta (the trainable view's layout), length setup.n_elements.
            weight: the bank's sample weight w > 0 (hidden from the server: masked like the rest).
            key: the job's BFV key (public suffices to encrypt).

        Raises:
            CryptoError: wrong round/job, a sender list without this bank, bad update;
            SecAggAbort: reason "too_few" when fewer than `floor()` banks sent shares.
        """
        started = time.perf_counter()
        setup = self._setup()
        if update.size != setup.n_elements:
            raise CryptoError(f"masked_input: update has {update.size} elements, the round expects {setup.n_elements}")
        plan = self._plan(request, key)
        self.held.update(plan.held)
        for c in plan.complaints:
            self._complain(c.dealer, c.reason, c.detail)
        self.masked_with = plan.masked_with
        self.senders = request.senders
        t_check = time.perf_counter()

        t = setup.params.plain_modulus
        n = setup.n_elements + 1
        masked = quantize(update, weight, setup.params, bank_id=self.bank_id)
        masked = add_mod(masked, self_mask(self.self_seed, n, t, **self._ids()), t)
        for peer in self.masked_with:
            m = pair_mask(plan.seeds[peer], n, t)
            masked = add_mod(masked, m, t) if self.bank_id < peer else sub_mod(masked, m, t)
        t_mask = time.perf_counter()
        bundle = encrypt_residues(masked, key, kind="masked_input", **self._ids())
        t_enc = time.perf_counter()
        receipt = messages.Receipt.signed(
            self.identity,
            **self._ids(),
            bundle_sha256=hashlib.sha256(bundle).digest(),
            masked_with=self.masked_with,
            complaints=tuple(self.complaints),
        )
        self.stage = "masked"
        self.timings["shares"] = self.timings.get("shares", 0.0) + (t_check - started)
        self.timings["masking"] = t_mask - t_check
        self.timings["encryption"] = t_enc - t_mask
        return messages.MaskedInput(receipt=receipt, bundle=bundle)

    def _plan(self, request: messages.MaskedInputRequest, key: BfvKey) -> _Plan:
        """The masked-input stage up to the masking, as a plan (nothing in `self` changes): the shares
        opened, the complaints, the peers to mask with and each pair's seed (every X25519 agreement
        done here, before any budget is spent)."""
        self._expect_stage("shared")
        setup = self._setup()
        self._check_round(request.job_id, request.round, "masked_input")
        check_key(setup, key, self.bank_id, "masked_input")
        senders = request.senders
        if list(senders) != sorted(set(senders)) or self.bank_id not in senders:
            raise CryptoError(f"masked_input: bad sender list {list(senders)}", reason="inconsistent")
        if not set(senders) <= set(setup.participants):
            raise CryptoError("masked_input: senders outside the participants", reason="inconsistent")
        need = self.floor()
        if len(senders) < need:
            raise messages.SecAggAbort(f"masked_input: {len(senders)} banks sent shares, need {need}", reason="too_few")

        plan = _Plan()
        complained = {c.dealer for c in self.complaints}

        def complain(dealer: str, reason: str, detail: str) -> None:
            if dealer not in complained:
                complained.add(dealer)
                plan.complaints.append(messages.Complaint(dealer=dealer, reason=reason, detail=detail[:200]))

        neighbours = set(self._neighbours())
        got: dict[str, messages.EncryptedShare] = {}
        for share in request.shares:
            if share.recipient != self.bank_id or share.dealer in got or share.dealer not in neighbours:
                complain(share.dealer, "share", "share misaddressed, duplicated or from a non-neighbour")
                continue
            got[share.dealer] = share
        for dealer in sorted(neighbours & set(senders)):
            if dealer in complained:
                continue
            if dealer not in self.peers or dealer not in got:
                complain(dealer, "share", "no valid advertisement or no share from this sender")
                continue
            try:
                plan.held[dealer] = self._open_share(got[dealer])
                plan.seeds[dealer] = pair_seed(
                    self.mask_sk,
                    self.peers[dealer].mask_pk,
                    job_id=setup.job_id,
                    round=setup.round,
                    a=self.bank_id,
                    b=dealer,
                )
            except CryptoError as e:  # the dealer's share or key is bad: blame the dealer
                plan.held.pop(dealer, None)
                plan.seeds.pop(dealer, None)
                complain(dealer, e.reason or "share", str(e))
        plan.masked_with = tuple(sorted(b for b in neighbours & set(senders) if b not in complained))
        return plan

    # -------------------------------------------------------------------------------------------
    # stage 3

    def consent(self, request: messages.UnmaskRequest) -> messages.UnmaskConsent:
        """Check the server's survivor/dropped view and sign it; this bank signs one view per round.

        Refuses (CryptoError, nothing signed) when the view overlaps survivors and dropped, names
        banks outside the stage-1 senders, leaves this bank out of the survivors, shows fewer than
        max(t, min_banks) survivors or a survivor without a valid signed receipt, disagrees with this
        bank on who masked with whom, or differs from a view it already signed.
        """
        started = time.perf_counter()
        view = self._accept_view(request, "consent")
        consent = messages.UnmaskConsent.signed(self.identity, **self._ids(), view_sha256=view)
        self.timings["unmask"] = time.perf_counter() - started
        return consent

    def _accept_view(self, request: messages.UnmaskRequest, where: str) -> bytes:
        """Rules V1-V8 of docs/secagg.md ("Release rules"); the view becomes this round's one view.

        Returns its digest. Raises CryptoError naming the rule (nothing is signed or released).
        """
        setup = self._setup()
        self._check_round(request.job_id, request.round, where)  # V1
        view = request.view_sha256()
        if self.stage in ("consented", "unmasked"):
            if view != self.unmask_digest:  # V8
                raise CryptoError(
                    f"{where}(bank {self.bank_id!r}): a second, different unmask view this round; refused (rule V8)",
                    reason="inconsistent",
                )
        else:
            self._expect_stage("masked")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:  # V2
            raise CryptoError(
                f"{where}: banks {sorted(survivors & dropped)} are both survivors and dropped; a bank never "
                f"releases both shares of one peer (rule V2)",
                reason="inconsistent",
            )
        if list(request.survivors) != sorted(survivors) or list(request.dropped) != sorted(dropped):
            raise CryptoError(
                f"{where}: survivors and dropped must be sorted and distinct (rule V2)", reason="inconsistent"
            )
        if not (survivors | dropped) <= set(self.senders) or self.bank_id not in survivors:  # V3
            raise CryptoError(
                f"{where}: survivor/dropped sets do not match the stage-1 senders (rule V3)", reason="inconsistent"
            )
        need = self.floor()
        if len(survivors) < need:  # V4
            raise messages.SecAggAbort(
                f"{where}: {len(survivors)} survivors, need {need}; nothing released (rule V4)", reason="too_few"
            )
        receipts = {r.bank_id: r for r in request.receipts}
        if set(receipts) != survivors or len(receipts) != len(request.receipts):  # V5
            raise CryptoError(f"{where}: exactly one receipt per survivor expected (rule V5)", reason="inconsistent")
        for r in receipts.values():
            verify_receipt(r, setup, self.pins)
        if receipts[self.bank_id].masked_with != self.masked_with:
            raise CryptoError(f"{where}: this bank's receipt is not the one it signed (rule V5)", reason="inconsistent")
        self._check_masking(receipts, where)  # V6, V7
        if self.stage == "masked":
            self.stage, self.unmask_digest = "consented", view
        return view

    def _check_masking(self, receipts: dict[str, messages.Receipt], where: str) -> None:
        """V6: every two survivors that neighbour each other masked with each other, per both signed
        receipts. V7: every survivor has at least `colluding + 1` surviving neighbours (so at least
        one honest one, whose pair mask hides it as long as neither of the pair's keys is released)."""
        setup = self._setup()
        survivors = sorted(receipts)
        for u in survivors:
            near = [
                w
                for w in neighbourhood(
                    u, setup.participants, job_id=setup.job_id, round=setup.round, k=setup.neighbours_k
                )
                if w in receipts
            ]
            for w in near:
                if u < w and not (w in receipts[u].masked_with and u in receipts[w].masked_with):
                    raise CryptoError(
                        f"{where}(bank {self.bank_id!r}): survivors {u!r} and {w!r} did not mask with each other "
                        f"(their signed receipts); with both in the sum neither would be hidden by the other (rule V6)",
                        reason="inconsistent",
                    )
            if len(near) < self.colluding + 1:
                raise CryptoError(
                    f"{where}(bank {self.bank_id!r}): survivor {u!r} has {len(near)} surviving neighbour(s), needs "
                    f"{self.colluding + 1} so that one is honest (rule V7)",
                    reason="inconsistent",
                )

    def floor(self) -> int:
        """Fewest survivors (contributors) this bank accepts: the threshold, the setup's and its own floor."""
        setup = self._setup()
        return max(setup.threshold, setup.min_banks, self.min_banks)

    def unmask(self, order: messages.UnmaskOrder) -> messages.UnmaskReply:
        """Release self-mask shares of survivors and mask-key shares of dropped banks.

        Only for the view this bank consented to, and only with at least `consent_quorum` distinct
        survivors' valid consents on it; a retry of the same order gets the same shares. An order
        without consents is taken when every stage-1 sender survived (nothing dropped): the bank
        runs the consent checks itself and the view becomes its one view of the round (only when
        everyone neighbours everyone).

        Raises:
            CryptoError: reason "inconsistent" (another view), "too_few" (not enough consents),
                "signature" (a consent that does not verify).
        """
        setup = self._setup()
        request = order.request
        self._check_round(request.job_id, request.round, "unmask")
        started = time.perf_counter()
        without_consents = not order.consents
        if without_consents:
            # Rule CF: only the view in which every participant sent shares and survived (nobody
            # dropped), and only when everyone neighbours everyone. It asks for self-mask shares
            # only and binds this bank like a signature (its one view of the round).
            if not complete_graph(setup):
                raise CryptoError(
                    "unmask: an order without consents under k-regular neighbourhoods; refused (rule CF)",
                    reason="inconsistent",
                )
            if request.dropped or set(request.survivors) != set(setup.participants):
                raise CryptoError(
                    f"unmask(bank {self.bank_id!r}): an order without consents must be the view in which every "
                    f"participant survived and nobody dropped; refused (rule CF)",
                    reason="inconsistent",
                )
            self._accept_view(request, "unmask")
        elif self.stage not in ("consented", "unmasked") or request.view_sha256() != self.unmask_digest:
            raise CryptoError(
                f"unmask(bank {self.bank_id!r}): not the view this bank consented to (rule U1)", reason="inconsistent"
            )
        survivors, dropped = set(request.survivors), set(request.dropped)
        signers = set()
        for c in order.consents:
            if c.bank_id not in survivors or c.view_sha256 != self.unmask_digest:
                raise CryptoError(f"unmask: consent of {c.bank_id!r} is not for this view", reason="inconsistent")
            self.pins.verify(c.bank_id, c.signed_bytes(), c.signature)
            if (c.job_id, c.round) != (setup.job_id, setup.round):
                raise CryptoError(f"unmask: consent of {c.bank_id!r} for another round", reason="replay")
            signers.add(c.bank_id)
        quorum = 0 if without_consents else consent_quorum(setup, self.colluding)
        if len(signers) < quorum:
            raise messages.SecAggAbort(
                f"unmask: {len(signers)} banks consented to this view, need {quorum}; nothing released",
                reason="too_few",
            )
        for peer, kind in [(s, "self_mask") for s in survivors] + [(d, "mask_key") for d in dropped]:
            if self.released.get(peer, kind) != kind:
                raise CryptoError(f"unmask: both shares of {peer!r} requested; refused", reason="inconsistent")
        shares = []
        for peer in sorted(survivors | dropped):
            held = self.held.get(peer)
            if held is None:
                continue
            kind = "self_mask" if peer in survivors else "mask_key"
            y, sig = (held.self_mask, held.self_mask_sig) if kind == "self_mask" else (held.mask_key, held.mask_key_sig)
            self.released[peer] = kind
            shares.append(
                messages.RevealedShare(dealer=peer, holder=self.bank_id, kind=kind, x=held.x, y=y, dealer_signature=sig)
            )
        self.stage = "unmasked"
        self.timings["unmask"] = self.timings.get("unmask", 0.0) + time.perf_counter() - started
        return messages.UnmaskReply(**self._ids(), shares=tuple(shares))

    # -------------------------------------------------------------------------------------------
    # accountability (fedmoe.crypto.secagg.accountability)

    def reveal(
        self,
        evidence: messages.QuarantineEvidence,
        key: BfvKey,
        rejects: Check,
        *,
        applied_round: int,
        reveals_left: int,
    ) -> messages.RoundReveal:
        """This round's mask secret key, for a quarantine this bank confirmed itself (rule R).

        Refused (CryptoError, nothing revealed): evidence of another round or setup; this bank not a
        contributor of it or its advertisement not its own; a round it already applied (a reveal
        never covers an applied round); no reveal left under its policy for this job; evidence whose
        sum is not the aggregate the server sent, or passes `rejects` (a fake quarantine:
        `accountability.verify_quarantine`). Only the mask key goes: never the identity key, another
        round's keys or the self-mask seed (the server already holds every survivor's).
        """
        setup = self._setup()
        where = f"reveal(bank {self.bank_id!r}, round {setup.round})"
        if evidence.setup != setup:
            raise CryptoError(f"{where}: evidence of another round or setup", reason="replay")
        if self.stage not in ("masked", "consented", "unmasked") or self.bank_id not in evidence.aggregate.contributors:
            raise CryptoError(f"{where}: this bank's input is not in that aggregate", reason="inconsistent")
        if self.advertisement not in evidence.advertisements:
            raise CryptoError(
                f"{where}: the evidence does not hold this bank's own advertisement", reason="inconsistent"
            )
        if applied_round >= setup.round:
            raise CryptoError(
                f"{where}: this bank applied round {applied_round}: a reveal never covers an applied round"
            )
        if reveals_left <= 0:
            raise CryptoError(f"{where}: this bank's policy allows no more reveals in this job ('max-reveals')")
        verify_quarantine(evidence, key, self.pins, rejects)
        return messages.RoundReveal.signed(
            self.identity, **self._ids(), evidence_sha256=evidence_digest(evidence), mask_sk=self.mask_sk
        )

    # -------------------------------------------------------------------------------------------
    # persistence between Flower messages

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state, secrets included: store with mode 0600, delete after the round."""
        return {
            "format": 1,
            "bank_id": self.bank_id,
            "stage": self.stage,
            "setup": None if self.setup is None else self.setup.to_dict(),
            "share_sk": self.share_sk.hex(),
            "mask_sk": self.mask_sk.hex(),
            "self_seed": self.self_seed.hex(),
            "advertisement": None if self.advertisement is None else self.advertisement.to_dict(),
            "peers": {b: {k: v.hex() for k, v in vars(p).items()} for b, p in self.peers.items()},
            "held": {b: _held_to_json(h) for b, h in self.held.items()},
            "complaints": [c.to_dict() for c in self.complaints],
            "senders": list(self.senders),
            "masked_with": list(self.masked_with),
            "unmask_digest": self.unmask_digest.hex(),
            "released": dict(self.released),
            "min_banks": self.min_banks,
            "colluding": self.colluding,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], identity: Identity, pins: ConsortiumPins) -> BankSecAgg:
        """Rebuild from `state_dict()` (the identity and pins are loaded from their own files)."""
        try:
            if state["format"] != 1 or state["bank_id"] != identity.bank_id:
                raise CryptoError(f"bank state: format/bank id mismatch ({state.get('bank_id')!r})")
            bank = cls(identity=identity, pins=pins, min_banks=state["min_banks"], colluding=state["colluding"])
            bank.stage = state["stage"]
            bank.setup = None if state["setup"] is None else messages.RoundSetup.from_dict(state["setup"])
            bank.share_sk = bytes.fromhex(state["share_sk"])
            bank.mask_sk = bytes.fromhex(state["mask_sk"])
            bank.self_seed = bytes.fromhex(state["self_seed"])
            adv = state["advertisement"]
            bank.advertisement = None if adv is None else messages.KeyAdvertisement.from_dict(adv)
            bank.peers = {b: _Peer(**{k: bytes.fromhex(v) for k, v in p.items()}) for b, p in state["peers"].items()}
            bank.held = {b: _held_from_json(h) for b, h in state["held"].items()}
            bank.complaints = [messages.Complaint.from_dict(c) for c in state["complaints"]]
            bank.senders = tuple(state["senders"])
            bank.masked_with = tuple(state["masked_with"])
            bank.unmask_digest = bytes.fromhex(state["unmask_digest"])
            bank.released = dict(state["released"])
        except (KeyError, TypeError, ValueError) as e:
            raise CryptoError(f"bank state: malformed ({e})", reason="malformed") from e
        return bank

    # -------------------------------------------------------------------------------------------

    def _setup(self) -> messages.RoundSetup:
        if self.setup is None:
            raise CryptoError("secure aggregation: advertise() must come first")
        return self.setup

    def _ids(self) -> dict[str, Any]:
        """This bank's round as the keywords its messages, masks and bundles all take: bank_id, job_id, round."""
        setup = self._setup()
        return {"bank_id": self.bank_id, "job_id": setup.job_id, "round": setup.round}

    def _expect_stage(self, stage: str) -> None:
        if self.stage != stage:
            raise CryptoError(
                f"bank {self.bank_id!r}: stage expected {stage!r}, got {self.stage!r} (out of order or replayed)",
                reason="inconsistent",
            )

    def _check_round(self, job_id: str, round: int, where: str) -> None:
        setup = self._setup()
        if (job_id, round) != (setup.job_id, setup.round):
            raise CryptoError(
                f"{where}: job/round expected ({setup.job_id!r}, {setup.round}), got ({job_id!r}, {round})",
                reason="replay",
            )

    def _neighbours(self) -> tuple[str, ...]:
        s = self._setup()
        return neighbourhood(self.bank_id, s.participants, job_id=s.job_id, round=s.round, k=s.neighbours_k)

    def _complain(self, dealer: str, reason: str, detail: str) -> None:
        if all(c.dealer != dealer for c in self.complaints):
            log.warning("bank %s: complaint about %s (%s): %s", self.bank_id, dealer, reason, detail)
            self.complaints.append(messages.Complaint(dealer=dealer, reason=reason, detail=detail[:200]))

    def _open_share(self, share: messages.EncryptedShare) -> _Held:
        setup = self._setup()
        dealer = share.dealer
        key = derive_key(
            self.share_sk,
            self.peers[dealer].share_pk,
            purpose="share-key",
            context=pair_context(setup.job_id, setup.round, self.bank_id, dealer),
        )
        plain = open_sealed(
            key,
            share.nonce,
            share.ciphertext,
            share_ad(setup.job_id, setup.round, dealer, self.bank_id),
            what=f"share from {dealer!r}",
        )
        try:
            held = _held_from_json(json.loads(plain))
        except (ValueError, KeyError, TypeError) as e:
            raise CryptoError(f"share from {dealer!r}: malformed plaintext", reason="share") from e
        if held.x != 1 + setup.participants.index(self.bank_id):
            raise CryptoError(f"share from {dealer!r}: x = {held.x} is not this bank's point", reason="share")
        for kind, y, sig in (
            ("self_mask", held.self_mask, held.self_mask_sig),
            ("mask_key", held.mask_key, held.mask_key_sig),
        ):
            payload = messages.share_signature_payload(
                job_id=setup.job_id, round=setup.round, dealer=dealer, holder=self.bank_id, kind=kind, x=held.x, y=y
            )
            self.pins.verify(dealer, payload, sig)
        return held


def open_aggregate(
    aggregate: messages.SecureAggregate,
    *,
    setup: messages.RoundSetup,
    key: BfvKey,
    pins: ConsortiumPins,
    min_banks: int = 2,
) -> tuple[np.ndarray, float]:
    """Check the signed contributor list, decrypt the sum and return the weighted mean and total weight.

    Args:
        aggregate: the server's SecureAggregate.
        setup: the round's setup (as the bank advertised it).
        key: the bank's secret BFV key.
        pins: the consortium pins.
        min_banks: the bank's own floor on distinct contributors.

    Returns:
        (mean float32 of n_elements, total weight).

    Raises:
        CryptoError: reason "replay" (other job/round), "signature"/"unknown_bank" (a receipt),
            "too_few" (fewer than max(min_banks, setup.min_banks) distinct signed contributors),
            or a decryption/plausibility failure.
    """
    if (aggregate.job_id, aggregate.round) != (setup.job_id, setup.round):
        raise CryptoError("open_aggregate: aggregate of another job/round", reason="replay")
    contributors = aggregate.contributors
    receipts = {r.bank_id: r for r in aggregate.receipts}
    if list(contributors) != sorted(set(contributors)) or set(receipts) != set(contributors):
        raise CryptoError("open_aggregate: contributors must be distinct, each with one receipt", reason="inconsistent")
    for r in receipts.values():
        verify_receipt(r, setup, pins)
    need = max(min_banks, setup.min_banks)
    if len(contributors) < need:
        raise CryptoError(f"open_aggregate: {len(contributors)} contributors, need {need}", reason="too_few")
    header, residues = decrypt_residues(aggregate.bundle, key)
    if (header.kind, header.job_id, header.round, header.n_values) != (
        "sum",
        setup.job_id,
        setup.round,
        setup.n_elements + 1,
    ):
        raise CryptoError("open_aggregate: bundle header does not describe this round's sum", reason="inconsistent")
    values = dequantize(residues, setup.params)  # (n + 1,): [sum w * delta..., sum w]
    total = float(values[-1])
    # A sum whose masks were not all removed decrypts to uniform residues: the weight slot is then
    # uniform in (-t/2, t/2] / scale and fails this check with probability > 1/2 (a cheap sanity
    # check, not a proof; the receipts and the server's commitment checks are the real guard).
    if not (total > 0 and total <= len(contributors) * setup.params.max_abs_value):
        raise CryptoError(f"open_aggregate: decrypted total weight {total:.6g} is implausible", reason="inconsistent")
    return (values[:-1] / total).astype(np.float32), total


def _held_to_json(h: _Held) -> dict[str, Any]:
    return {
        "x": h.x,
        "self_mask": h.self_mask.hex(),
        "self_mask_sig": h.self_mask_sig.hex(),
        "mask_key": h.mask_key.hex(),
        "mask_key_sig": h.mask_key_sig.hex(),
    }


def _held_from_json(d: dict[str, Any]) -> _Held:
    return _Held(
        x=int(d["x"]),
        self_mask=bytes.fromhex(d["self_mask"]),
        self_mask_sig=bytes.fromhex(d["self_mask_sig"]),
        mask_key=bytes.fromhex(d["mask_key"]),
        mask_key_sig=bytes.fromhex(d["mask_key_sig"]),
    )
