"""k-regular neighbourhoods from the run config (`secagg-neighbours`, issue 30; in-process rounds).

With `secagg-neighbours` k > 0 the server proposes a k-regular masking graph (Bell et al. 2020):
each bank masks with k others, its shares go to those k, and every round runs the consent exchange
(rule CF). What could fail: the setup the banks accept must carry k, each bank must mask with k
banks only, and the decrypted sum must still be the plaintext mean of every bank's update.
"""

from __future__ import annotations

import pytest
from local_grid import LocalGrid
from test_secagg_rounds import JOB, assert_mean_of_kept_deltas, banks, run_config, run_job

from fedmoe.crypto.secagg.messages import RoundSetup
from fedmoe.crypto.secagg.params import neighbourhood
from fedmoe.fl_server.ceremony import loopback_ceremony
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.errors import ConfigError
from fedmoe.protocol.messages import unpack_secagg_result

pytestmark = [pytest.mark.slow, pytest.mark.federation]

N_BANKS, K = 6, 4  # k < n - 1: not everyone neighbours everyone


def round_setup(tmp_path, round_idx: int) -> RoundSetup:
    blob = (tmp_path / "server" / JOB / "aggregates" / f"round-{round_idx:04d}.bundle").read_bytes()
    return RoundSetup.from_bytes(unpack_secagg_result(blob)[0])


def test_k_regular_neighbourhoods_sum_to_the_plaintext_mean(tmp_path):
    loopback_ceremony(tmp_path / "keys", [f"bank-{i}" for i in range(N_BANKS)])
    config = run_config(tmp_path, **{"secagg-neighbours": K, "synthetic-banks": N_BANKS, "min-banks": 3})
    state = run_job(tmp_path, LocalGrid(banks(N_BANKS), config), config)
    everyone = [f"bank-{i}" for i in range(N_BANKS)]
    for record in state.rounds:
        assert record.aggregated and record.participants == everyone, (record.no_aggregate, record.left_out)
        assert round_setup(tmp_path, record.round).neighbours_k == K  # what every bank signed and accepted
        assert "secagg-consent" in record.seconds  # k-regular: consents every round (rule CF)
        assert_mean_of_kept_deltas(tmp_path, record.round, everyone)


def test_secagg_neighbours_is_checked():
    with pytest.raises(ConfigError, match="'secagg-neighbours' expected 0 .* or an even number >= 2, got 3"):
        JobConfig.from_run_config({"secagg-neighbours": 3})
    assert len(neighbourhood("bank-0", [f"bank-{i}" for i in range(N_BANKS)], job_id="j", round=1, k=K)) == K
