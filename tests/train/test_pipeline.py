"""What training notes about a table before it fits anything."""

import numpy as np

from app.train.pipeline import MIN_ORDERED_ROWS, ordered_columns


def test_a_column_that_moves_one_way_from_every_row_to_the_next_is_named():
    rng = np.random.default_rng(0)
    n = 50
    clock = 1.7e9 + np.cumsum(rng.uniform(1, 60, n))  # seconds, irregular steps
    values = np.c_[clock, rng.normal(size=n), -np.arange(n), np.sort(rng.integers(0, 10, n))]
    # the sorted integers repeat a value (a step of 0): ordered, but not the way a clock is
    assert ordered_columns(values, ["time", "reading", "countdown", "level"]) == ["time", "countdown"]
    # a sorted column is noted, whatever it holds; an unsorted copy of the same values is not
    assert ordered_columns(values[rng.permutation(n)], ["time", "reading", "countdown", "level"]) == []


def test_a_short_table_is_too_likely_ordered_by_chance_to_note():
    values = np.arange(float(MIN_ORDERED_ROWS - 1))[:, None]
    assert ordered_columns(values, ["x"]) == []
    assert ordered_columns(np.arange(float(MIN_ORDERED_ROWS))[:, None], ["x"]) == ["x"]
