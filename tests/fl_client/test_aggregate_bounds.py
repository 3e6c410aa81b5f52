"""The aggregate check at its edges (issue 32): the coordinate bound at 0.99x / 1.01x, the weight at
min-banks - 1 and max-banks + 1, fractional and non-finite weights and values.

A check whose bound was 1000x too loose, or whose weight window was off by one, passed every older
test; each case here sits just inside or just outside what fedmoe/fl_client/aggregate_check.py says.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmoe.fl_client.aggregate_check import (
    ADAM_STEP_BOUND,
    QUANTIZATION_SLACK,
    AggregateRejected,
    check_aggregate,
    check_contribution,
    coordinate_bound,
)
from fedmoe.protocol.config import JobConfig

# local-lr x local-steps x clip-norm = 0.5 x 3 x 0.8 = 1.2; a product, so no sum/ratio mutant agrees
ADAM = JobConfig(update_rule="adam", local_lr=0.5, local_steps=3, clip_norm=0.8, lr=0.02, min_banks=3, max_banks=5)
# mean: 8 x lr x local-steps = 8 x 0.02 x 3 = 0.48
MEAN = JobConfig(update_rule="mean", local_lr=0.5, local_steps=3, clip_norm=0.8, lr=0.02, min_banks=3, max_banks=5)


def test_the_bounds_are_the_documented_products():
    assert coordinate_bound(ADAM) == pytest.approx(0.5 * 3 * 0.8 + QUANTIZATION_SLACK, rel=1e-12)
    assert coordinate_bound(JobConfig(update_rule="sgdm", local_lr=0.5, local_steps=3, clip_norm=0.8)) == (
        coordinate_bound(ADAM)
    )
    assert coordinate_bound(MEAN) == pytest.approx(ADAM_STEP_BOUND * 0.02 * 3, rel=1e-12)
    assert ADAM_STEP_BOUND == 8.0 and 2.0**-21 < QUANTIZATION_SLACK <= 1e-5


@pytest.mark.parametrize("job", [ADAM, MEAN], ids=["adam", "mean"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_coordinate_at_099_passes_and_at_101_is_rejected(job, sign):
    bound = coordinate_bound(job)
    mean = np.zeros(100)
    mean[37] = sign * 0.99 * bound
    check_aggregate(job, 4, mean, total_weight=3.0)
    assert check_contribution(job, mean) is None
    mean[37] = sign * bound  # the bound itself is honest
    check_aggregate(job, 4, mean, total_weight=3.0)
    assert check_contribution(job, mean) is None
    mean[37] = sign * 1.01 * bound
    with pytest.raises(AggregateRejected, match="above the bound") as err:
        check_aggregate(job, 4, mean, total_weight=3.0)
    assert err.value.round == 4 and "round 4" in str(err.value)
    assert "above the bound" in check_contribution(job, mean)


@pytest.mark.parametrize("weight", [3.0, 4.0, 5.0, 5.0004, 2.9996])
def test_a_whole_number_of_contributors_in_range_passes(weight):
    check_aggregate(ADAM, 1, np.zeros(10), total_weight=weight)


@pytest.mark.parametrize("weight", [2.0, 6.0, 65.0, 3.5, 4.002, 3.0 + 2e-3, 0.0, -3.0, math.nan, math.inf])
def test_a_weight_outside_min_max_banks_or_fractional_or_not_finite_is_rejected(weight):
    """max-banks + 1 and min-banks - 1 are refused; so are fractions beyond fixed-point error and NaN."""
    with pytest.raises((AggregateRejected, ValueError, OverflowError)) as err:
        check_aggregate(ADAM, 2, np.zeros(10), total_weight=weight)
    if err.type is AggregateRejected:
        assert "total weight" in str(err.value) and err.value.round == 2


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_value_is_rejected_and_counted(bad):
    mean = np.zeros(50)
    mean[[3, 9]] = bad
    with pytest.raises(AggregateRejected, match="2 non-finite") as err:
        check_aggregate(ADAM, 6, mean, total_weight=3.0)
    assert err.value.round == 6
    assert check_contribution(ADAM, mean) == "2 non-finite value(s) in its update"


def test_an_empty_update_has_no_peak():
    """Its peak is 0, below a bound under 1 (MEAN: 0.48), not some placeholder above it."""
    check_aggregate(MEAN, 1, np.zeros(0), total_weight=3.0)
    assert check_contribution(MEAN, np.zeros(0)) is None
