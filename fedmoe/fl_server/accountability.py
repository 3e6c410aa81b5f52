"""Accountable rounds, the server's side (docs/secagg.md "Accountable rounds"; issue 25, item 4).

When most banks reject round q's aggregate in round r (the round is quarantined), the server:

  reveal   sends round q's kept evidence (`ServerSecAgg.evidence()`: setup, signed advertisements,
           masked inputs with their receipts, unmask replies, aggregate) to each of its contributors
           that is here; a bank whose policy allows it checks the quarantine is real (it recomputes
           the sum with its own BFV key) and answers with round q's mask secret key (`RoundReveal`),
           or refuses naming its rule
  accuse   sends the evidence and the reveals to every bank here; each opens the contributions it
           can and answers with a signed `Verdict` (the accused and their signed receipts)
  name     counts the verdicts (fedmoe.crypto.secagg.verdicts): a bank accused by more than half of
           the valid verdicts is excluded from the job (`ServerState.excluded`); the round is then
           run again without it

The server decrypts nothing here: it relays signed messages and counts signed verdicts. What it
keeps for the auditor, under `<job>/accountability/round-NNNN/`: evidence.bin, the reveals and the
verdicts (anyone holding the BFV key re-checks each finding from them).
"""

from __future__ import annotations

import logging

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.secagg.messages import AccuseRequest, QuarantineEvidence, RoundReveal
from fedmoe.crypto.secagg.verdicts import Tally, tally
from fedmoe.fl_server.outcomes import Outcome
from fedmoe.fl_server.secagg_round import SecAggRound
from fedmoe.fl_server.state import ServerStore
from fedmoe.protocol.files import atomic_write_bytes, atomic_write_json
from fedmoe.protocol.messages import SecAggStage

logger = logging.getLogger(__name__)


class Accountability:
    """The reveal and accuse exchanges for one quarantined round, over the current round's nodes."""

    def __init__(self, round_driver: SecAggRound, store: ServerStore, quarantined: int) -> None:
        self.driver, self.store, self.quarantined = round_driver, store, quarantined
        self.folder = store.root / "accountability" / f"round-{quarantined:04d}"
        self.refusals: dict[str, str] = {}

    def run(self) -> Tally | None:
        """The verdicts on the quarantined round, or None when it cannot be judged (no evidence kept)."""
        path = self.store.evidence_file(self.quarantined)
        if not path.exists():
            logger.warning("round %d quarantined, but no evidence of it is kept: nobody can be named", self.quarantined)
            return None
        evidence = QuarantineEvidence.from_bytes(path.read_bytes())
        here = set(self.driver.nodes)
        contributors = [b for b in evidence.aggregate.contributors if b in here]
        replies = self.driver.exchange(SecAggStage.REVEAL, dict.fromkeys(contributors, evidence))
        reveals = self.reveals(evidence, replies)
        self.refusals = {b: o.reason for b, o in self.driver.failed.items() if b in contributors}
        request = AccuseRequest(evidence=evidence, reveals=tuple(reveals))
        verdicts = self.driver.exchange(SecAggStage.ACCUSE, dict.fromkeys(sorted(here), request))
        result = tally(evidence, verdicts, self.driver.keys.pins)
        self.keep(evidence, reveals, verdicts, result)
        return result

    def reveals(self, evidence: QuarantineEvidence, replies: dict[str, bytes]) -> list[RoundReveal]:
        """The reveals that name this evidence and their own bank (the banks re-check each)."""
        out = []
        for bank, payload in sorted(replies.items()):
            try:
                reveal = RoundReveal.from_bytes(payload)
            except CryptoError as err:
                self.driver.fail(bank, Outcome.INVALID_REPLY, f"reveal: {err}")
                continue
            if reveal.bank_id != bank or reveal.evidence_sha256 != evidence.digest():
                self.driver.fail(bank, Outcome.INVALID_REPLY, "reveal: of another bank or other evidence")
                continue
            out.append(reveal)
        return out

    def keep(
        self, evidence: QuarantineEvidence, reveals: list[RoundReveal], verdicts: dict[str, bytes], result: Tally
    ) -> None:
        """What an auditor needs to re-check the finding (public or signed material only)."""
        atomic_write_bytes(self.folder / "evidence.bin", evidence.to_bytes())
        for reveal in reveals:
            atomic_write_bytes(self.folder / f"reveal-{reveal.bank_id}.bin", reveal.to_bytes())
        for bank, payload in verdicts.items():
            atomic_write_bytes(self.folder / f"verdict-{bank}.bin", payload)
        atomic_write_json(
            self.folder / "summary.json",
            {
                "round": self.quarantined,
                "revealed_by": sorted(r.bank_id for r in reveals),
                "refused_to_reveal": self.refusals,
                "judges": result.judges,
                "votes": result.votes,
                "masked": result.masked,
                "invalid_verdicts": result.invalid,
                "named": result.named(),
            },
        )
