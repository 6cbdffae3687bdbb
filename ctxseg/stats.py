"""Seed statistics behind every verdict of a study: mean, sample standard deviation, and a 95% interval of
a difference of means by Welch's t (unequal variances, Welch-Satterthwaite degrees of freedom).

A verdict is read off the interval and nothing else: "helped" when it lies above zero, "hurt" when it lies
below, "not distinguishable with N seeds" when it contains zero, and no verdict at all when either side
has a single seed (one run gives no estimate of the noise). There is no fixed threshold.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

__all__ = ["mean_sd", "Comparison", "compare", "LEVEL", "METHOD"]

LEVEL = 0.95
METHOD = "Welch's t, 95% interval over seeds"


def _finite(values: Sequence[Optional[float]]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_sd(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """(mean, sample standard deviation with n - 1) of the finite values; sd is None for fewer than two."""
    xs = _finite(values)
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


@dataclasses.dataclass(frozen=True)
class Comparison:
    """``a - b`` over seeds: the difference of means, its interval (None with a single seed on a side)."""

    diff: Optional[float]
    low: Optional[float]
    high: Optional[float]
    n_a: int
    n_b: int

    @property
    def verdict(self) -> str:
        if self.diff is None:
            return "n/a"
        if self.low is None or self.high is None:
            return "no verdict (one seed gives no estimate of the noise)"
        if self.low > 0:
            return "helped"
        if self.high < 0:
            return "hurt"
        return f"not distinguishable with {min(self.n_a, self.n_b)} seeds"

    def interval_text(self, scale: float = 100.0, digits: int = 2) -> str:
        """``+1.23 [−0.40, +2.86]`` (points with the default scale), or the difference alone."""
        if self.diff is None:
            return "–"
        text = f"{scale * self.diff:+.{digits}f}"
        if self.low is not None and self.high is not None:
            text += f" [{scale * self.low:+.{digits}f}, {scale * self.high:+.{digits}f}]"
        return text


def compare(a: Sequence[Optional[float]], b: Sequence[Optional[float]], level: float = LEVEL) -> Comparison:
    """Welch's t interval of mean(a) - mean(b) at ``level`` over the finite values of each side."""
    xa, xb = _finite(a), _finite(b)
    if not xa or not xb:
        return Comparison(None, None, None, len(xa), len(xb))
    (ma, sa), (mb, sb) = mean_sd(xa), mean_sd(xb)
    diff = ma - mb
    if sa is None or sb is None:
        return Comparison(diff, None, None, len(xa), len(xb))
    va, vb = sa * sa / len(xa), sb * sb / len(xb)
    se = math.sqrt(va + vb)
    if se == 0.0:  # every seed scored the same on both sides: no spread, the difference is exact
        return Comparison(diff, diff, diff, len(xa), len(xb))
    df = (va + vb) ** 2 / (va * va / (len(xa) - 1) + vb * vb / (len(xb) - 1))
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, df)) * se
    return Comparison(diff, diff - half, diff + half, len(xa), len(xb))
