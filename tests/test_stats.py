"""Seed statistics (ctxseg.stats) against scipy's own Welch test and a direct computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from ctxseg.stats import compare, mean_sd


def test_mean_sd_is_the_sample_sd():
    assert mean_sd([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2))
    assert mean_sd([0.4]) == (0.4, None) and mean_sd([]) == (None, None)
    assert mean_sd([0.4, None, float("nan"), 0.6])[0] == pytest.approx(0.5)


@pytest.mark.parametrize("a, b", [([0.60, 0.62, 0.61], [0.58, 0.59, 0.585]),
                                  ([0.80, 0.70, 0.75, 0.72], [0.70, 0.74]),
                                  ([0.50, 0.55, 0.40], [0.52, 0.49, 0.51])])
def test_welch_interval_equals_scipy(a, b):
    got = compare(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert got.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert (got.low, got.high) == (pytest.approx(ref.low), pytest.approx(ref.high))


def test_verdict_comes_from_the_interval_only():
    assert compare([0.60, 0.62, 0.61], [0.50, 0.51, 0.52]).verdict == "helped"
    assert compare([0.50, 0.51, 0.52], [0.60, 0.62, 0.61]).verdict == "hurt"
    # a 5-point mean difference at 10-point seed noise is not a verdict
    assert compare([0.70, 0.55, 0.80], [0.60, 0.62, 0.61]).verdict == "not distinguishable with 3 seeds"
    # a 0.3-point difference at tiny noise is one: no fixed threshold
    assert compare([0.603, 0.6031, 0.6029], [0.600, 0.6001, 0.5999]).verdict == "helped"
    one = compare([0.9], [0.5])
    assert one.diff == pytest.approx(0.4) and one.low is None and one.verdict.startswith("no verdict")
    assert "[" not in one.interval_text() and compare([], [0.5]).verdict == "n/a"
    text = compare([0.60, 0.62, 0.61], [0.50, 0.51, 0.52]).interval_text()
    assert text.startswith("+10.00 [") and math.isfinite(float(text.split("[")[1].split(",")[0]))
