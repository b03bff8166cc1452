import math

import pytest

from mama.metrics.stats import PairedCI, paired_ci, t_quantile


@pytest.mark.parametrize(
    ("df", "expected"),  # two-sided 95% critical values from a printed t table
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)],
)
def test_t_quantile_matches_the_table(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_other_levels_and_the_normal_limit() -> None:
    assert t_quantile(0.95, 4) == pytest.approx(2.1318, abs=1e-4)
    assert t_quantile(0.995, 4) == pytest.approx(4.6041, abs=1e-4)
    assert t_quantile(0.975, 2000) == pytest.approx(1.9612, abs=1e-3)  # -> 1.96


def test_paired_ci_by_hand() -> None:
    # Differences a - b = 1, 2, 3, 4, 5: mean 3, sample sd sqrt(2.5), se sqrt(2.5)/sqrt(5) = sqrt(0.5),
    # half width t_{0.975, 4} * sqrt(0.5) = 2.776445 * 0.707107 = 1.963243.
    a = [11.0, 12.0, 13.0, 14.0, 15.0]
    b = [10.0, 10.0, 10.0, 10.0, 10.0]
    ci = paired_ci(a, b)
    assert ci.n == 5 and ci.mean == pytest.approx(3.0)
    assert ci.low == pytest.approx(3 - 1.963243, abs=1e-5) and ci.high == pytest.approx(3 + 1.963243, abs=1e-5)
    assert ci.excludes_zero() and str(ci) == "+3.0 [+1.0, +5.0]"
    flipped = paired_ci(b, a)
    assert (flipped.mean, flipped.low, flipped.high) == pytest.approx((-3.0, -ci.high, -ci.low))


def test_paired_ci_removes_the_shared_seed_variation() -> None:
    # Per-seed results vary by 20 points, but b is always a + 1: the paired interval is exactly -1.
    a = [40.0, 60.0, 50.0]
    b = [x + 1 for x in a]
    assert paired_ci(a, b) == PairedCI(-1.0, -1.0, -1.0, 3)
    two = paired_ci([1.0, 3.0], [0.0, 0.0])  # d = 1, 3: mean 2, se 1, t_{0.975, 1} = 12.706
    assert two.low == pytest.approx(2 - 12.7062, abs=1e-4) and not two.excludes_zero()


def test_paired_ci_refuses_what_it_cannot_compute() -> None:
    with pytest.raises(ValueError, match="same seeds"):
        paired_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_ci([1.0], [2.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_ci([1.0, 2.0], [0.0, 0.0], confidence=1.0)
    assert math.isfinite(t_quantile(0.999, 1))
