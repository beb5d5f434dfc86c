"""Thresholds and p-values against a direct numpy computation."""

import numpy as np
import pytest

from app.bundle.calibration import p_values, threshold


@pytest.mark.parametrize("n", [10, 99, 1000])
def test_p_values_equal_the_direct_count(n):
    rng = np.random.default_rng(n)
    calibration = np.sort(np.round(rng.standard_normal(n), 1))  # ties on purpose
    new = np.r_[np.round(rng.standard_normal(500) * 2, 1), calibration[:5], -np.inf, np.inf]
    direct = np.array([(1 + np.sum(calibration >= s)) / (n + 1) for s in new])
    np.testing.assert_array_equal(p_values(calibration, new), direct)


# rates below 1/n cannot be calibrated (refused, see below): those pairs are no case here
CALIBRATABLE = [(n, fpr) for n in (10, 99, 1000, 1001) for fpr in (0.1, 0.05, 0.01, 0.001) if fpr >= 1 / n]


@pytest.mark.parametrize(("n", "fpr"), CALIBRATABLE)
def test_flagging_above_the_threshold_is_flagging_small_p_values(n, fpr):
    rng = np.random.default_rng(int(n / fpr))
    calibration = np.sort(np.round(rng.standard_normal(n), 2))
    new = np.r_[np.round(rng.standard_normal(2000) * 1.5, 2), calibration]
    t = threshold(calibration, fpr)
    np.testing.assert_array_equal(new > t, p_values(calibration, new) <= fpr)
    # on the calibration rows themselves, the flagged share is at most the rate
    assert np.mean(calibration > t) <= fpr + 1e-12


def test_rates_below_one_over_n_are_refused():
    calibration = np.arange(50.0)
    with pytest.raises(ValueError, match=r"below 1/n = 0.02 for 50 calibration rows"):
        threshold(calibration, 0.01)
    assert threshold(calibration, 0.02) == 49.0
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        threshold(calibration, 1.5)
