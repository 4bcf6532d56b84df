"""Seed statistics: mean, sample std and Student's t 95% interval, on values with known answers."""

import math

import pytest

from evaluation.stats import Spread, t_quantile_975


def test_spread_of_known_values():
    s = Spread.of([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.std == 1.0 and s.n == 3 and (s.min, s.max) == (1.0, 3.0)
    # t(0.975, 2) = 4.3027: the half-width is 4.3027 * 1 / sqrt(3)
    assert s.ci95 == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert (s.low, s.high) == pytest.approx((2 - 2.4842, 2 + 2.4842), abs=1e-3)
    assert s.format(scale=100, unit="%") == "200.0 +- 248.4%"


def test_one_value_has_no_interval_and_says_so():
    s = Spread.of([0.5])
    assert s.mean == 0.5 and s.n == 1 and math.isnan(s.std) and math.isnan(s.ci95)
    assert s.format(scale=100, unit="%") == "50.0%"
    with pytest.raises(ValueError):
        Spread.of([])


def test_identical_seeds_have_zero_spread():
    s = Spread.of([0.25] * 4)
    assert s.std == 0.0 and s.ci95 == 0.0


@pytest.mark.parametrize(("df", "t"), [(1, 12.7062), (2, 4.3027), (10, 2.2281), (30, 2.0423),
                                       (40, 2.0211), (60, 2.0003), (120, 1.9799), (1000, 1.9623)])
def test_t_quantiles_match_the_tables(df, t):
    assert t_quantile_975(df) == pytest.approx(t, abs=2e-4)
