"""The learning-rate grid and choice of ``surm compare --tune-lr``, and the paired differences of ``--reference``."""

from __future__ import annotations

import math
import statistics

import pytest

from surm.commands.paired import paired_difference, t_quantile_975
from surm.commands.tuning import ladder_index, ladder_rate, lr_grid, pick_rate
from surm.methods import METHODS, default_learning_rate


@pytest.mark.parametrize("default, points, grid", [
    (1e-3, 3, [3e-4, 1e-3, 3e-3]),
    (3e-3, 3, [1e-3, 3e-3, 1e-2]),
    (1e-2, 5, [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]),
    (1e-3, 2, [1e-3, 3e-3]),
    (1e-1, 4, [3e-2, 1e-1, 3e-1, 1.0]),
    (5e-4, 3, [1e-4, 3e-4, 1e-3]),  # off the ladder: its nearest rung in log scale (3e-4; 1e-3 is farther)
])
def test_lr_grid_is_the_ladder_around_the_default(default, points, grid):
    assert lr_grid(default, points) == pytest.approx(grid, rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gets_the_same_number_of_points_centred_on_its_default(method):
    default = default_learning_rate(method)
    grid = lr_grid(default, 5)
    assert len(grid) == len(set(grid)) == 5 and grid == sorted(grid)
    assert grid[2] == pytest.approx(default)  # every default is on the ladder
    assert all(b / a == pytest.approx(math.sqrt(10), rel=0.06) for a, b in zip(grid, grid[1:]))


def test_ladder_round_trips():
    for index in range(-20, 4):
        assert ladder_index(ladder_rate(index)) == index


@pytest.mark.parametrize("points", [0, 1, -3, 2.5, "3", True])
def test_a_grid_needs_two_points(points):
    with pytest.raises(ValueError, match="--tune-lr takes the number of grid points per method, at least 2"):
        lr_grid(1e-3, points)


@pytest.mark.parametrize("rate", [0, -1e-3, float("nan"), float("inf"), "1e-3"])
def test_a_rate_must_be_positive_and_finite(rate):
    with pytest.raises(ValueError, match="a learning rate must be a positive finite number"):
        ladder_index(rate)


def test_pick_rate_takes_the_best_mean_validation_accuracy():
    assert pick_rate({3e-4: [0.70, 0.72], 1e-3: [0.80, 0.70], 3e-3: [0.74, 0.78]}, 1e-3) == 3e-3


def test_pick_rate_breaks_ties_towards_the_default_then_the_smaller_rate():
    assert pick_rate({3e-4: [0.8], 1e-3: [0.8], 3e-3: [0.8]}, 1e-3) == 1e-3
    assert pick_rate({3e-4: [0.8], 3e-3: [0.8], 1e-2: [0.7]}, 1e-3) == 3e-4


def test_pick_rate_skips_failed_rates_and_needs_one():
    assert pick_rate({1e-3: [], 3e-3: [0.6]}, 1e-3) == 3e-3
    with pytest.raises(ValueError, match="no tuning run finished"):
        pick_rate({1e-3: []}, 1e-3)


def test_t_quantiles():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303 and t_quantile_975(30) == 2.042
    assert t_quantile_975(40) == pytest.approx(2.021, abs=2e-3)
    assert t_quantile_975(120) == pytest.approx(1.980, abs=2e-3)
    assert t_quantile_975(10 ** 6) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_paired_difference_over_shared_seeds():
    values = {0: 0.80, 1: 0.84, 2: 0.81, 3: 0.99}
    reference = {0: 0.78, 1: 0.80, 2: 0.80}
    difference = paired_difference(values, reference)
    d = [0.02, 0.04, 0.01]
    half = 4.303 * statistics.stdev(d) / math.sqrt(3)
    assert difference.seeds == (0, 1, 2)
    assert difference.mean == pytest.approx(statistics.fmean(d))
    assert (difference.low, difference.high) == pytest.approx((statistics.fmean(d) - half, statistics.fmean(d) + half))


def test_paired_difference_with_one_or_no_shared_seed():
    one = paired_difference({0: 0.9}, {0: 0.8, 1: 0.7})
    assert one.mean == pytest.approx(0.1) and one.low is None and one.high is None
    assert paired_difference({0: 0.9}, {1: 0.8}) is None
