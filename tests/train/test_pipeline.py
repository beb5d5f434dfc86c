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


def test_gross_training_values_are_noted_by_column():
    """The robust scale does not grow with a few gross values, so they lie millions of scales out."""
    from app.bundle.scaler import Scaler
    from app.train.pipeline import GROSS_SCALES, gross_note

    rng = np.random.default_rng(1)
    values = rng.normal(size=(500, 3))
    values[:4, 1] = 1e12  # a sentinel, or a wrong unit
    x = Scaler.fit(values, "robust").transform(values)
    assert np.abs(x[:, 1]).max() > 1e11 and np.abs(x[:, [0, 2]]).max() < GROSS_SCALES
    (note,) = gross_note(x, ["a", "b", "c"])
    assert note.startswith("column(s) 'b' (up to ") and "'a'" not in note and "'c'" not in note
    # The deviation grows with the values: none can lie beyond sqrt(n - 1) deviations of the mean.
    assert gross_note(Scaler.fit(values, "standard").transform(values), ["a", "b", "c"]) == []
    assert np.sqrt(499) < GROSS_SCALES


def test_training_keeps_the_gross_values_note_in_the_bundle(tmp_path):
    from app.train.options import Candidate, FitOptions
    from app.train.pipeline import TrainRequest, train_bundle

    rng = np.random.default_rng(2)
    values = rng.normal(size=(300, 3))
    values[::10, 2] = 1e12  # a tenth of the rows: some are training rows whatever the split
    request = TrainRequest(
        [Candidate(latent_dim=1, hidden=8)], FitOptions(steps=5), fprs=(0.1,), default_fpr=0.1
    )
    result = train_bundle(values, ["a", "b", "c"], request, tmp_path / "bundle")
    assert any(note.startswith("column(s) 'c' (up to ") for note in result.bundle.training["notes"])
