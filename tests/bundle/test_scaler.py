"""Standardisation: both scalings against independent computations (numpy's moments, scipy's
robust statistics), their fallbacks, and what the robust one is for."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from app.bundle.scaler import IQR_OF_NORMAL, Scaler

# Both sides are a handful of float64 order statistics or sums over at most 4 000 values: a
# difference of a few ulps per operation, far below this.
RTOL = 1e-12


@pytest.fixture
def table() -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.c_[
        rng.normal(5.0, 2.0, 4000),  # normal: both scalings estimate the same deviation
        rng.lognormal(0.0, 1.5, 4000),  # heavy right tail
        rng.poisson(0.2, 4000),  # a count mostly 0: its middle half is one value
    ]


def test_standard_is_the_mean_and_population_deviation(table: np.ndarray) -> None:
    scaler = Scaler.fit(table, "standard")
    np.testing.assert_allclose(scaler.mean, [np.mean(column) for column in table.T], rtol=RTOL)
    np.testing.assert_allclose(scaler.scale, stats.tstd(table, axis=0, ddof=0), rtol=RTOL)


def test_robust_is_the_median_and_the_normal_consistent_iqr(table: np.ndarray) -> None:
    scaler = Scaler.fit(table, "robust")
    np.testing.assert_allclose(scaler.mean, np.median(table, axis=0), rtol=RTOL)
    iqr = stats.iqr(table[:, :2], axis=0, scale="normal")  # scipy divides by 2 Phi^-1(3/4)
    np.testing.assert_allclose(scaler.scale[:2], iqr, rtol=RTOL)
    assert pytest.approx(2 * stats.norm.ppf(0.75), rel=1e-15) == IQR_OF_NORMAL


def test_robust_and_standard_agree_on_a_normal_column(table: np.ndarray) -> None:
    # The interquartile range of 4 000 normal draws has a relative standard error of about
    # 1.17 / sqrt(4000) = 0.019 (the asymptotic variance of a quantile): 4 of them bound it.
    robust, standard = Scaler.fit(table, "robust"), Scaler.fit(table, "standard")
    assert robust.scale[0] == pytest.approx(standard.scale[0], rel=4 * 0.019)
    assert robust.scale[0] == pytest.approx(2.0, rel=4 * 0.019)


def test_a_column_without_interquartile_range_keeps_its_deviation(table: np.ndarray) -> None:
    assert np.percentile(table[:, 2], 25) == np.percentile(table[:, 2], 75) == 0
    assert Scaler.fit(table, "robust").scale[2] == pytest.approx(np.std(table[:, 2]), rel=RTOL)


@pytest.mark.parametrize("scaling", ["standard", "robust"])
def test_a_constant_column_is_scaled_by_one(scaling: str) -> None:
    x = np.c_[np.full(10, 7.0), np.arange(10.0)]
    scaler = Scaler.fit(x, scaling)  # type: ignore[arg-type]
    assert scaler.mean[0] == 7.0 and scaler.scale[0] == 1.0
    np.testing.assert_array_equal(scaler.transform(x)[:, 0], 0.0)


def test_a_few_extreme_rows_move_the_robust_scale_by_a_few_order_statistics(table: np.ndarray) -> None:
    """Five counts of 1e5 to 1e7 among 4 000 rows (the audit's case): the deviation grows by orders of
    magnitude, compressing every other row towards one value; the quartiles move by at most five
    order statistics each, which between the 25th and 75th percentiles of a smooth density is
    a relative change of about 5 / 4000 per quartile times the density's slope: well under 1%."""
    spoiled = table.copy()
    spoiled[:5, 0] = [1e5, 3e5, 1e6, 3e6, 1e7]
    standard = Scaler.fit(spoiled, "standard").scale[0] / Scaler.fit(table, "standard").scale[0]
    robust = Scaler.fit(spoiled, "robust").scale[0] / Scaler.fit(table, "robust").scale[0]
    assert standard > 1e4
    assert robust == pytest.approx(1.0, abs=0.01)


def test_an_unknown_scaling_is_refused(table: np.ndarray) -> None:
    with pytest.raises(ValueError, match="scaling must be one of"):
        Scaler.fit(table, "minmax")  # type: ignore[arg-type]
