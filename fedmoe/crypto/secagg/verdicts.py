"""The server's side of an accountable round: count the banks' signed verdicts (no decryption here).

After a quarantine, each bank that holds the BFV key opens the round's contributions from the
evidence and the reveals (fedmoe.crypto.secagg.accountability.verdict) and signs what it found.
The server cannot check a finding itself (it cannot decrypt), so it counts: a bank is named when
more than half of the valid verdicts accuse it. Each accusation carries the accused's own signed
receipt, so a verdict can only point at an input the accused really sent, and anyone holding the
BFV key (every bank, the auditor) re-checks the finding from the kept evidence and reveals.
A verdict that is not signed by its bank, names other evidence, or holds a receipt that is not one
of the round's is invalid and not counted (its bank is named in `invalid`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import ConsortiumPins
from fedmoe.crypto.secagg.messages import QuarantineEvidence, Verdict


@dataclass
class Tally:
    """What the verdicts of one quarantined round say."""

    round: int
    judges: list[str] = field(default_factory=list)  # banks whose verdict was valid
    votes: dict[str, list[str]] = field(default_factory=dict)  # accused -> judges who accused it
    reasons: dict[str, str] = field(default_factory=dict)  # accused -> the first judge's reason
    masked: dict[str, list[str]] = field(default_factory=dict)  # judge -> inputs it could not open
    invalid: dict[str, str] = field(default_factory=dict)  # bank -> why its verdict was not counted

    def named(self) -> dict[str, str]:
        """Accused by more than half of the valid verdicts (at least two): bank -> the finding."""
        out = {}
        for bank, judges in sorted(self.votes.items()):
            if len(judges) >= 2 and 2 * len(judges) > len(self.judges):
                out[bank] = (
                    f"named poisoner of round {self.round} by {', '.join(judges)} "
                    f"({len(judges)} of {len(self.judges)} verdicts): {self.reasons[bank]}"
                )
        return out


def check_verdict(bank: str, verdict: Verdict, evidence: QuarantineEvidence, pins: ConsortiumPins) -> None:
    """Raises CryptoError unless `verdict` is `bank`'s, signed, about this evidence, and every
    accusation in it carries one of the round's signed receipts."""
    setup = evidence.setup
    if verdict.bank_id != bank:
        raise CryptoError(f"verdict from {bank!r} claims to be {verdict.bank_id!r}", reason="inconsistent")
    pins.verify(bank, verdict.signed_bytes(), verdict.signature)
    if (verdict.job_id, verdict.round) != (setup.job_id, setup.round):
        raise CryptoError(f"verdict of {bank!r} is for another round", reason="replay")
    if verdict.evidence_sha256 != evidence.digest():
        raise CryptoError(f"verdict of {bank!r} names other evidence", reason="inconsistent")
    receipts = {i.receipt.bank_id: i.receipt for i in evidence.inputs}
    for accusation in verdict.accused:
        if receipts.get(accusation.bank_id) != accusation.receipt or accusation.round != setup.round:
            raise CryptoError(
                f"verdict of {bank!r} accuses {accusation.bank_id!r} without that bank's receipt of the round",
                reason="inconsistent",
            )


def tally(evidence: QuarantineEvidence, replies: dict[str, bytes], pins: ConsortiumPins) -> Tally:
    """Counts the valid verdicts among `replies` ({bank: Verdict bytes})."""
    result = Tally(round=evidence.setup.round)
    for bank, payload in sorted(replies.items()):
        try:
            verdict = Verdict.from_bytes(payload)
            check_verdict(bank, verdict, evidence, pins)
        except CryptoError as err:
            result.invalid[bank] = f"{err} ({err.reason})"
            continue
        result.judges.append(bank)
        if verdict.masked:
            result.masked[bank] = list(verdict.masked)
        for accusation in verdict.accused:
            result.votes.setdefault(accusation.bank_id, []).append(bank)
            result.reasons.setdefault(accusation.bank_id, accusation.reason)
    return result
