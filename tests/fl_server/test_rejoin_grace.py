"""A bank whose SuperNode restarts between rounds is back in the next round (issue 27; in-process).

On the old code the server started each round with whoever was connected once min-banks were: a
bank away for a few seconds (its SuperNode restarting) missed the round although it was on its way
back. Now the server waits up to `rejoin-grace` for the job's known banks, once per absence: a bank
gone for good delays one round, not every round.
"""

from __future__ import annotations

import pytest
from local_grid import LocalGrid
from test_secagg_rounds import banks, keys, run_config  # noqa: F401

from fedmoe.fl_server.console import SilentReporter
from fedmoe.fl_server.federation import Federation
from fedmoe.protocol.config import JobConfig

pytestmark = [pytest.mark.slow, pytest.mark.federation]

AWAY_NODE = 103  # bank-3


class AwayGrid(LocalGrid):
    """LocalGrid in which bank-3's node is not connected for `away_polls` node listings after round 1
    (None: it never comes back), as a restarted SuperNode is until the SuperLink activates it again."""

    def __init__(self, node_configs, run_config, away_polls: int | None) -> None:
        super().__init__(node_configs, run_config)
        self.away_polls = away_polls
        self.gone = False
        self.listings_away = 0

    def get_node_ids(self):
        nodes = list(self.node_configs)
        if not self.gone:
            return nodes
        if self.away_polls is not None and self.listings_away >= self.away_polls:
            return nodes
        self.listings_away += 1
        return [n for n in nodes if n != AWAY_NODE]


class NotingReporter(SilentReporter):
    """Keeps the loop's notes; takes bank-3 away once round 1 is done."""

    def __init__(self, grid: AwayGrid) -> None:
        self.grid, self.notes = grid, []

    def note(self, text: str) -> None:
        self.notes.append(text)

    def round_done(self, record, state) -> None:
        if record.round == 1:
            self.grid.gone = True


def run(tmp_path, away_polls: int | None, grace: float, rounds: int = 3):
    config = run_config(tmp_path, **{"num-rounds": rounds, "min-banks": 3, "rejoin-grace": grace})
    grid = AwayGrid(banks(4), config, away_polls)
    reporter = NotingReporter(grid)
    state = Federation(grid=grid, job=JobConfig.from_run_config(config), reporter=reporter).run()
    return state, reporter.notes


def test_a_bank_back_within_the_grace_is_in_the_next_round(tmp_path, keys):  # noqa: F811
    state, notes = run(tmp_path, away_polls=2, grace=30.0, rounds=2)
    four = ["bank-0", "bank-1", "bank-2", "bank-3"]
    assert [r.participants for r in state.rounds] == [four, four], [r.left_out for r in state.rounds]
    assert "waiting up to 30 s for bank-3 to reconnect" in notes
    assert not any("not back within" in n for n in notes)


def test_a_bank_gone_for_good_delays_one_round_by_the_grace_not_every_round(tmp_path, keys):  # noqa: F811
    state, notes = run(tmp_path, away_polls=None, grace=3.0)
    three = ["bank-0", "bank-1", "bank-2"]
    r1, r2, r3 = state.rounds
    assert r1.aggregated and "bank-3" in r1.participants
    assert r2.participants == r3.participants == three and r2.aggregated and r3.aggregated
    assert r2.outcomes["bank-3"] == r3.outcomes["bank-3"] == "not connected"
    assert notes.count("waiting up to 3 s for bank-3 to reconnect") == 1, notes
    assert "bank-3 not back within rejoin-grace 3 s" in notes


def test_rejoin_grace_is_checked():
    with pytest.raises(Exception, match="'rejoin-grace' expected >= 0 seconds, got -1"):
        JobConfig.from_run_config({"rejoin-grace": -1.0})
