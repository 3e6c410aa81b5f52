"""Issue 16: one exchange per round (a bank reports the loss of the model it applied with its next
train reply; a closing message delivers and evaluates the last aggregate), metrics.csv for
plotting tools, a console that summarises once there are more than six banks."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from local_grid import LocalGrid
from rich.console import Console
from test_hostile_rounds import run_config as hostile_run_config

from fedmoe.crypto import keygen
from fedmoe.fl_server.console import ConsoleReporter, summary_table
from fedmoe.fl_server.federation import Federation
from fedmoe.fl_server.state import RoundRecord, ServerState
from fedmoe.protocol.config import JobConfig

REPO = Path(__file__).resolve().parents[2]
DEMO_POLICY = REPO / "deploy" / "demo-bank-policy.toml"  # releases train and eval losses


@pytest.mark.slow
def test_one_train_exchange_per_round_and_one_closing_message(tmp_path):
    keygen(tmp_path / "keys")
    # the hostile-rounds job (CKKS: one train exchange per round; secure aggregation has five stages)
    run_config = hostile_run_config(tmp_path, **{"job-id": "trips", "evaluate": True})
    nodes = {100 + i: {"bank-id": f"bank-{i}", "partition-id": i, "policy-file": str(DEMO_POLICY)} for i in range(3)}
    grid = LocalGrid(nodes, run_config)
    state = Federation(grid=grid, job=JobConfig.from_run_config(run_config), reporter=_Quiet()).run()

    assert state.finished and [r.aggregated for r in state.rounds] == [True, True]
    for node in nodes:  # train, train, then the closing message: no evaluate exchange inside the job
        assert [kind for n, kind, _ in grid.delivered if n == node] == ["train", "train", "evaluate"]
    banks = {"bank-0", "bank-1", "bank-2"}
    # start model: with round 1's train reply; round 1's model: with round 2's; round 2's: closing message
    assert set(state.eval_round0) == banks
    assert set(state.rounds[0].eval_loss) == banks and set(state.rounds[1].eval_loss) == banks
    assert all(state.applied[b] == 2 for b in banks)
    # what reaches the server: the released losses and two timings that do not grow with the dataset
    # (the evaluation's duration and the process's memory would tell it the size of the bank's data)
    for record in state.rounds:
        assert all(set(m) == {"train-loss", "seconds-train", "seconds-encrypt"} for m in record.train_metrics.values())

    rows = list(csv.DictReader((tmp_path / "server" / "trips" / "metrics.csv").open()))
    assert [(r["round"], r["bank"]) for r in rows] == [(str(k), b) for k in (0, 1, 2) for b in sorted(banks)]
    for row in rows:
        loss = float(row["eval_loss"])
        assert math.isfinite(loss) and 0 < loss < 10
        round_idx = int(row["round"])
        expected = state.eval_round0 if round_idx == 0 else state.rounds[round_idx - 1].eval_loss
        assert loss == pytest.approx(expected[row["bank"]], abs=1e-6)
    assert all(float(r["train_loss"]) > 0 for r in rows if r["round"] != "0")


def _state(n_banks: int) -> ServerState:
    losses = {f"bank-{i}": 4.0 + i / 10 for i in range(n_banks)}
    record = RoundRecord(round=1, participants=sorted(losses), aggregated=True, eval_loss=losses)
    return ServerState(job_id="wide", rounds=[record], eval_round0={b: 5.8 for b in losses}, completed_round=1)


def _render(renderable) -> str:
    console = Console(record=True, width=160, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def test_more_than_six_banks_are_summarised_with_the_worst_named():
    wide = _render(summary_table("wide", _state(15)))
    assert "worst bank" in wide and "bank-14" in wide and "bank-3" not in wide  # no column per bank
    assert "4.700" in wide and "4.000" in wide and "5.400" in wide  # mean, min, max of round 1
    narrow = _render(summary_table("narrow", _state(3)))
    assert all(f"bank-{i}" in narrow for i in range(3)) and "worst bank" not in narrow


def test_round_line_quotes_the_losses_the_banks_reported_for_the_previous_model(capsys):
    console = Console(width=200, force_terminal=False)
    state = _state(15)
    nxt = RoundRecord(round=2, participants=["bank-0"], aggregated=True)
    state.rounds.append(nxt)
    ConsoleReporter(console).round_done(nxt, state)
    line = capsys.readouterr().out
    assert "after round 1: mean 4.700, min 4.000, max 5.400 (bank-14) over 15 banks" in line


class _Quiet:
    def note(self, text):
        pass

    def job_started(self, federation, n_banks):
        pass

    def answered(self, what, bank, pending, seconds):
        assert pending == sorted(pending) and bank not in pending

    def round_done(self, record, state):
        pass

    def job_done(self, federation):
        pass


def test_a_busy_superlink_is_retried_not_fatal(tmp_path):
    """15 banks polling at 0.2 s once made the SuperLink answer a pull with HTTP 500 ("database is
    locked"), and the ServerApp died mid-round; a failed pull is now retried at the next poll."""
    from types import SimpleNamespace

    keygen(tmp_path / "keys")
    config = {"job-id": "busy", "aggregation": "ckks", "model-preset": "tiny", "key-dir": str(tmp_path / "keys"),
              "server-state-dir": str(tmp_path / "server"), "bank-state-root": str(tmp_path / "banks")}  # fmt: skip

    class BusyGrid(LocalGrid):
        failures = 3

        def pull_messages(self, message_ids):
            if self.failures:
                self.failures -= 1
                raise RuntimeError("Server error '500 Internal Server Error' (database is locked)")
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=m)) for m in message_ids]

    federation = Federation(grid=BusyGrid({}, config), job=JobConfig.from_run_config(config), reporter=_Quiet())
    replies = federation.collect({"m-1": 100, "m-2": 101}, "round 1 train")
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m-1", "m-2"]
