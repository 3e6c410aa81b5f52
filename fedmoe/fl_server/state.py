"""The server's state dir: what it may keep (DESIGN.md): encrypted sums, participants, reasons.

    <server-state-dir>/<job-id>/
        job.json                 the run config of the job
        state.json               completed round, per-bank applied round, per-round records
        aggregates/round-NNNN.bundle   encrypted sum (and encrypted total weight) of round N
        evidence/round-NNNN.bin  secure aggregation: what round N's sum was unmasked from (signed
                                 inputs and shares), kept for the next round's quarantine check
        accountability/round-NNNN/     a quarantined round's evidence, reveals, verdicts, summary.json
        results.json             per-round table for people and tools
        metrics.csv              one row per round and bank (eval loss, outcome, seconds): for plotting

Never a secret key, never a plaintext update. Every write is atomic, and state.json is written
last, so a restarted server resumes from the last round whose aggregate is on disk.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmoe.protocol.config import RESUBMIT_MAY_CHANGE, JobConfig
from fedmoe.protocol.errors import ConfigError
from fedmoe.protocol.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json


@dataclass
class RoundRecord:
    round: int
    participants: list[str] = field(default_factory=list)  # banks whose ciphertext was added
    left_out: dict[str, str] = field(default_factory=dict)  # bank or node -> reason
    outcomes: dict[str, str] = field(default_factory=dict)  # bank or node -> Outcome (typed, see federation)
    aggregated: bool = False
    no_aggregate: str = ""  # why the round produced no aggregate ("" when it did)
    quarantined: list[int] = field(default_factory=list)  # earlier rounds whose aggregate banks rejected here
    quarantine_reason: str = ""  # set on a round whose own aggregate was quarantined later
    named: dict[str, str] = field(default_factory=dict)  # bank -> finding: poisoned a quarantined round
    train_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_loss: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class ServerState:
    job_id: str
    completed_round: int = 0
    start_hash: str = ""
    applied: dict[str, int] = field(default_factory=dict)  # bank -> last aggregate it applied
    seen: list[str] = field(default_factory=list)  # every bank (or unnamed node) met so far
    exhausted: dict[str, str] = field(default_factory=dict)  # bank -> why it is no longer selected
    excluded: dict[str, str] = field(default_factory=dict)  # bank -> the finding that named it a poisoner
    node_bank: dict[str, str] = field(default_factory=dict)  # SuperNode id -> bank (ids survive restarts)
    rounds: list[RoundRecord] = field(default_factory=list)
    eval_round0: dict[str, float] = field(default_factory=dict)
    finished: bool = False
    end_reason: str = ""

    def quarantine(self, round_idx: int, reason: str) -> bool:
        """Marks a round's aggregate as never to be sent again; False if it is not a live aggregate."""
        for record in self.rounds:
            if record.round == round_idx and record.aggregated:
                record.aggregated, record.quarantine_reason = False, reason
                record.no_aggregate = f"aggregate quarantined: {reason}"
                return True
        return False


class ServerStore:
    def __init__(self, job: JobConfig) -> None:
        self.job = job
        self.root = Path(job.server_state_dir) / job.job_id

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def aggregate_file(self, round_idx: int) -> Path:
        return self.root / "aggregates" / f"round-{round_idx:04d}.bundle"

    def load_or_init(self) -> ServerState:
        job_file = self.root / "job.json"
        config = self.job.to_run_config()
        if job_file.exists():
            saved = read_json(job_file)
            changed = sorted(k for k in config if k not in RESUBMIT_MAY_CHANGE and saved.get(k) != config[k])
            if changed:
                raise ConfigError(
                    f"{job_file}: job {self.job.job_id!r} exists with a different config ({changed}); "
                    "use a new job-id or remove the state dir"
                )
        else:
            atomic_write_json(job_file, config)
        if not self.state_file.exists():
            return ServerState(job_id=self.job.job_id)
        raw: dict[str, Any] = read_json(self.state_file)
        raw["rounds"] = [RoundRecord(**r) for r in raw.get("rounds", [])]
        return ServerState(**raw)

    def save(self, state: ServerState) -> None:
        atomic_write_json(self.state_file, asdict(state))

    def save_aggregate(self, round_idx: int, bundle: bytes) -> None:
        atomic_write_bytes(self.aggregate_file(round_idx), bundle)

    def evidence_file(self, round_idx: int) -> Path:
        return self.root / "evidence" / f"round-{round_idx:04d}.bin"

    def keep_evidence(self, round_idx: int, evidence: bytes) -> None:
        """A secure round's evidence (signed inputs and shares, the sum), kept for the next round's
        quarantine check (fedmoe.fl_server.accountability); older rounds' are deleted."""
        atomic_write_bytes(self.evidence_file(round_idx), evidence)
        for old in (self.root / "evidence").glob("round-*.bin"):
            if int(old.stem.split("-")[1]) < round_idx - 1:
                old.unlink(missing_ok=True)

    def aggregates_after(self, state: ServerState, applied_round: int) -> dict[int, bytes]:
        """Encrypted sums of the rounds after `applied_round` that produced one."""
        out = {}
        for record in state.rounds:
            if record.aggregated and record.round > applied_round:
                out[record.round] = self.aggregate_file(record.round).read_bytes()
        return out

    def write_results(self, state: ServerState, extra: dict[str, Any]) -> Path:
        path = self.root / "results.json"
        atomic_write_json(path, {"state": asdict(state), **extra})
        return path

    def write_metrics(self, state: ServerState) -> Path:
        """metrics.csv, rewritten whole: a bank reports the loss of round r's model in round r + 1.
        `aggregated` 0: the round's aggregate is missing or quarantined (no bank applied it)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(METRICS_COLUMNS)
        for bank, loss in sorted(state.eval_round0.items()):
            writer.writerow([0, bank, "start", 1, f"{loss:.6f}", "", "", "", ""])
        for r in state.rounds:
            for bank, outcome in sorted(r.outcomes.items()):
                metrics = r.train_metrics.get(bank, {})
                row = [r.round, bank, outcome, int(r.aggregated), r.eval_loss.get(bank), metrics.get("train-loss")]
                row += [metrics.get("seconds-train"), metrics.get("seconds-encrypt"), r.seconds.get("round")]
                writer.writerow(["" if v is None else f"{v:.6f}" if isinstance(v, float) else v for v in row])
        path = self.root / "metrics.csv"
        atomic_write_text(path, out.getvalue())
        return path


METRICS_COLUMNS = (
    "round", "bank", "outcome", "aggregated", "eval_loss", "train_loss",
    "seconds_train", "seconds_encrypt", "seconds_round",
)  # fmt: skip
