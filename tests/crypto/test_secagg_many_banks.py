"""Secure aggregation past the old 64-bank bound (issue 30): sums of 70 banks, the room each bank has,
and the refusal of a federation larger than the parameters' max_banks."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_helpers import make_updates, run_round, start_round, weighted_mean

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import ConsortiumPins, generate_identity
from fedmoe.crypto.secagg.bank import BankSecAgg, open_aggregate
from fedmoe.crypto.secagg.bfv import load_bfv_public
from fedmoe.crypto.secagg.bfv_secret import bfv_keygen
from fedmoe.crypto.secagg.params import SecAggParams, dequantize, quantize
from fedmoe.crypto.secagg.server import ServerSecAgg

MANY = 70  # past the old bound of 64, and more than the 1024-bank parameters' room needs to prove
LENGTH = 40  # a short update: the cost of 70 banks is in the pairwise keys and shares, not the vector


@pytest.fixture(scope="module")
def many_identities(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("many_ids")
    ids = [generate_identity(folder / f"b{i:03d}.identity.secret", f"bank{i:03d}") for i in range(MANY)]
    return ids, ConsortiumPins.from_identities(ids)


def test_seventy_banks_sum_within_half_a_quantization_step(many_identities, bfv_public, bfv_secret) -> None:
    """Everyone neighbours everyone (what fl_server proposes), weight 1 per bank (what the bank
    policy sends): the mean is off by at most half a step, 2^-21, whatever the number of banks."""
    ids, pins = many_identities
    r = start_round(ids, pins, bfv_public, LENGTH)
    banks = list(r.banks)
    updates, _ = make_updates(banks, LENGTH, scale=1e-2)
    weights = dict.fromkeys(banks, 1.0)
    run_round(r, updates, weights, bfv_public, skip_consent=True)  # nobody dropped: no consent exchange
    mean, total = open_aggregate(r.aggregate, setup=r.setup, key=bfv_secret, pins=pins)
    assert r.setup.threshold == 47 and r.server.exclusions == []  # ceil(2 * 70 / 3)
    assert r.aggregate.contributors == tuple(banks) and total == MANY
    half_step = 0.5 / r.setup.params.scale
    assert np.abs(mean - weighted_mean(updates, weights, banks)).max() <= half_step + 1e-9  # + float32 inputs


@pytest.mark.parametrize("banks", [64, 100, 128, 1024])
def test_extreme_inputs_of_max_banks_never_wrap(banks: int) -> None:
    """Every bank at the edge of its room, all of one sign: the residue sum still decodes exactly.
    The room shrinks with max_banks, the quantization step does not."""
    params = SecAggParams(max_banks=banks)
    edge = params.max_abs_value
    for sign in (1.0, -1.0):
        residue = int(quantize(np.array([sign * edge]), 1.0, params)[0])
        total = residue * banks % params.plain_modulus  # what the decrypted sum of `banks` such inputs holds
        assert dequantize(np.array([total], dtype=np.uint64), params)[0] == pytest.approx(sign * edge * banks)
    assert params.scale == 2.0**20  # the step is 2^-20 at any max_banks
    with pytest.raises(CryptoError, match=f"room of t = 2\\^58 for {banks} banks"):
        quantize(np.array([edge * 1.001]), 1.0, params)


def test_more_participants_than_max_banks_are_refused(many_identities, tmp_path) -> None:
    """A job whose BFV key was made for at most 64 banks refuses a 65-bank round, at the server and at
    each bank, with the bound in the message: its sums could wrap modulo t."""
    ids, pins = many_identities
    key = load_bfv_public(bfv_keygen(tmp_path / "bfv64", SecAggParams(max_banks=64)).public_path)
    setup = ServerSecAgg.make_setup(
        job_id="job-many", round=1, participants=[i.bank_id for i in ids[:65]], n_elements=LENGTH, key=key
    )
    with pytest.raises(CryptoError, match="65 participants exceed params.max_banks 64") as e:
        ServerSecAgg(setup, pins, key)
    assert e.value.reason == "inconsistent"
    bank = BankSecAgg(ids[0], pins)
    with pytest.raises(CryptoError, match="65 participants exceed params.max_banks 64"):
        bank.advertise(setup)
    assert bank.stage == "new"
