"""The members' common scale: ranks against scipy's percentile of score, and their mean."""

import numpy as np
import pytest
from scipy.stats import percentileofscore

from app.bundle.ensemble import rank_mean, ranks


def test_ranks_are_the_weak_percentile_of_score():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal(101)
    scores = np.r_[rng.standard_normal(50), reference[:10], -10.0, 10.0]  # ties with the reference too
    expected = [percentileofscore(reference, s, kind="weak") / 100 for s in scores]
    np.testing.assert_allclose(ranks(reference, scores), expected, rtol=0, atol=1e-15)
    assert ranks(reference, [-10.0, 10.0]).tolist() == [0.0, 1.0]
    assert np.isnan(ranks(reference, [np.nan])).all()
    with pytest.raises(ValueError, match="non-empty"):
        ranks(np.array([]), scores)


def test_the_ensemble_score_is_the_mean_rank_and_no_member_dominates():
    rng = np.random.default_rng(1)
    small, huge = (
        rng.standard_normal(200),
        1e6 * rng.standard_cauchy(200),
    )  # scales 1 and 1e6, one heavy tailed
    rows = [np.array([0.0, 3.0, -3.0]), np.array([0.0, -1e9, 1e9])]
    combined = rank_mean([small, huge], rows)
    weak = [
        [percentileofscore(ref, s, kind="weak") / 100 for s in member]
        for ref, member in zip([small, huge], rows, strict=True)
    ]
    expected = np.mean(weak, axis=0)
    np.testing.assert_allclose(combined, expected, atol=1e-15)
    assert combined[1] == pytest.approx(combined[2], abs=0.02)  # one member's extreme counts no more than 1
    with pytest.raises(ValueError, match="2 reference sets for 1 members"):
        rank_mean([small, huge], rows[:1])
