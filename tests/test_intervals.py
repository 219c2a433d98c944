"""Paired bootstrap intervals over clips (`matrixgame_env.eval.intervals`), checked against float64 math."""

from __future__ import annotations

import math

import numpy as np
import pytest

from matrixgame_env.eval.intervals import Interval, paired_interval, per_clip_values


def test_a_constant_difference_has_no_spread():
    before = [18.0, 19.5, 17.25, 20.0]
    interval = paired_interval(before, [v - 0.5 for v in before])
    assert interval.mean == pytest.approx(-0.5, abs=1e-12)
    assert interval.low == pytest.approx(-0.5, abs=1e-12) and interval.high == pytest.approx(-0.5, abs=1e-12)
    assert interval.excludes_zero and interval.format() == "-0.50 [-0.50, -0.50]"


def test_the_interval_of_normal_differences_is_about_the_normal_theory_one():
    """32 clips whose differences have mean 0.3 and spread 1: the bootstrap's 95 % interval is within
    a tenth of the normal-theory one, mean +- 1.96 sd / sqrt(n) (computed in float64)."""
    rng = np.random.default_rng(5)
    before = rng.normal(19.0, 3.0, 32)
    differences = rng.normal(0.3, 1.0, 32)
    interval = paired_interval(before, before + differences)
    exact_mean = float(np.mean(differences, dtype=np.float64))
    half = 1.96 * float(np.std(differences)) / math.sqrt(32)
    assert interval.mean == pytest.approx(exact_mean, abs=1e-12)
    assert interval.high - interval.low == pytest.approx(2 * half, rel=0.1)
    assert interval.low < exact_mean < interval.high


def test_swapping_the_reports_mirrors_the_interval():
    rng = np.random.default_rng(6)
    a, b = rng.normal(0.8, 0.05, 20), rng.normal(0.82, 0.05, 20)
    forward, backward = paired_interval(a, b), paired_interval(b, a)
    assert backward.mean == pytest.approx(-forward.mean, abs=1e-12)
    assert backward.low == pytest.approx(-forward.high, abs=1e-12)
    assert backward.high == pytest.approx(-forward.low, abs=1e-12)
    assert paired_interval(a, b) == forward  # seeded: the same inputs, the same interval


def test_differences_smaller_than_their_spread_are_not_told_apart():
    rng = np.random.default_rng(7)
    before = rng.normal(19.0, 3.0, 32)
    interval = paired_interval(before, before + rng.normal(0.0, 2.0, 32) + 0.05)
    assert not interval.excludes_zero and interval.low < 0 < interval.high


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        ([1.0, 2.0], [1.0, 2.0, 3.0], "one value per clip"),
        ([1.0], [2.0], "at least 2 clips"),
        ([1.0, math.inf], [2.0, 3.0], "finite"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "one value per clip"),
    ],
)
def test_unpairable_figures_are_refused(before, after, message):
    with pytest.raises(ValueError, match=message):
        paired_interval(before, after)


def test_level_and_samples_are_checked():
    with pytest.raises(ValueError, match="level"):
        paired_interval([1.0, 2.0], [1.0, 2.0], level=1.0)
    with pytest.raises(ValueError, match="samples"):
        paired_interval([1.0, 2.0], [1.0, 2.0], samples=0)


def test_per_clip_values_take_only_finite_lists_of_the_clip_count():
    assert per_clip_values([1, 2.5], 2) == [1.0, 2.5]
    assert per_clip_values([1.0, 2.0], 3) is None
    assert per_clip_values([1.0, math.inf], 2) is None
    assert per_clip_values([True, 1.0], 2) is None
    assert per_clip_values(None, 2) is None


def test_an_interval_as_plain_values():
    assert Interval(0.1, -0.2, 0.4).as_dict() == {"mean": 0.1, "low": -0.2, "high": 0.4, "level": 0.95}
