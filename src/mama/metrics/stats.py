"""Paired confidence intervals for comparing two variants run on the same seeds.

Two variants trained with the same seeds share data order, initialisation and evaluation set, so their
per-seed results are paired: the interval is built from the per-seed differences (Student's t with
n - 1 degrees of freedom), which removes the seed-to-seed variation both variants share.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["PairedCI", "paired_ci", "t_quantile"]


class PairedCI(NamedTuple):
    """Mean of the per-seed differences ``a - b`` and its confidence interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4, finite sums)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):  # 1 + 2/3 c^2 + (2*4)/(3*5) c^4 + ... (df - 3 in the last)
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        series = math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0
        return 2 / math.pi * (theta + series)
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):  # 1 + 1/2 c^2 + (1*3)/(2*4) c^4 + ... (df - 2 in the last)
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with integer ``df`` >= 1, by bisection (~1e-12)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    mass = 2 * p - 1  # two-sided mass inside [-t, t]
    low, high = 0.0, 1.0
    while _t_two_sided_mass(high, df) < mass:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_two_sided_mass(mid, df) < mass else (low, mid)
        if high - low < 1e-12 * high:
            break
    return (low + high) / 2


def paired_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedCI:
    """Mean and ``confidence`` interval of the paired differences ``a[i] - b[i]`` (same seed ``i``).

    ``mean ± t_{(1+confidence)/2, n-1} · sd(d) / sqrt(n)`` with ``sd`` the sample standard deviation of
    the ``n`` differences. Needs n >= 2; with identical differences the interval has zero width.
    """
    if len(a) != len(b):
        raise ValueError(f"paired results need the same seeds: {len(a)} vs {len(b)} values")
    if len(a) < 2:
        raise ValueError(f"a confidence interval needs at least 2 pairs, got {len(a)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    half = t_quantile((1 + confidence) / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedCI(mean, mean - half, mean + half, len(diffs))
