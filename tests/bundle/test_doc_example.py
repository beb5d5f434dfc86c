"""docs/bundle.md section 10 as a reader meets it: its code, run as printed, gives the figures the
document quotes after it, and the product's own scores."""

import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from app.bundle.format import load_bundle
from app.engine.torch_backend import TorchScorer

from ..conftest import CONSTANT_COLUMNS, manifold_rows, with_constants
from .test_reimplementation import holdout_rows

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "bundle.md").read_text()
SECTION = DOC[DOC.index("## 10. Worked example") :]
CODE = re.search(r"```python\n(.*?)```", SECTION, re.DOTALL).group(1)


@pytest.fixture(scope="module")
def run(monkeypatch_module):
    monkeypatch_module.chdir(ROOT)
    namespace = {"x_raw": holdout_rows()[1][:2]}
    exec(compile(CODE, "docs/bundle.md section 10", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def quoted(method):
    """The table row of `method`: scores, first row's parts, p-values, threshold."""
    row = re.search(rf"^\| `{method}` \|(.*)\|$", SECTION, re.MULTILINE).group(1)
    scores, parts, p_values, threshold = (cell.strip() for cell in row.split("|"))
    numbers = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    return (
        numbers(scores),
        numbers(parts),
        [float(Fraction(p)) for p in p_values.split(",")],
        float(threshold),
    )


@pytest.mark.parametrize("method", ["likelihood", "encoder", "projected"])
def test_the_worked_example_gives_the_quoted_figures(run, method):
    scores, p_values, threshold, flagged = run["results"][method]
    want_scores, want_parts, want_p, want_threshold = quoted(method)
    np.testing.assert_allclose(scores, want_scores, atol=5e-5)  # quoted to 4 decimals
    parts = run[method](run["x"])
    np.testing.assert_allclose([p[0] for p in parts], want_parts, atol=5e-5)
    np.testing.assert_array_equal(p_values, want_p)
    assert threshold == pytest.approx(want_threshold, abs=5e-5)
    assert flagged.all() and "All six rows are flagged" in SECTION


@pytest.mark.parametrize("method", ["likelihood", "encoder", "projected"])
def test_the_worked_example_is_the_product(run, method):
    bundle = load_bundle(ROOT / "models" / "default")
    assert f"`version` `{bundle.version}`" in SECTION
    reference = TorchScorer(bundle, dtype="float64").score(run["x_raw"], method)
    rtol = 1e-7 if method == "projected" else 1e-10
    np.testing.assert_allclose(run["results"][method][0], reference.score, rtol=rtol)


def test_the_worked_example_scores_a_bundle_with_constant_columns(constant_bundle):
    """The same code, pointed at a version-3 bundle: it sets the constant columns aside and flags a
    row that differs there, as the product does."""
    bundle = constant_bundle.bundle
    code = CODE.replace('root = "models/default"', f"root = {str(bundle.path)!r}")
    assert code != CODE
    x_raw = with_constants(manifold_rows(6, seed=4))
    x_raw[1, CONSTANT_COLUMNS.index("site")] = 5.0
    x_raw[4, CONSTANT_COLUMNS.index("zero")] = 1e-9
    namespace = {"x_raw": x_raw}
    exec(compile(code, "docs/bundle.md section 10", "exec"), namespace)
    np.testing.assert_array_equal(namespace["off"], [False, True, False, False, True, False])
    for method in ("likelihood", "encoder", "projected"):
        scores, p_values, _, flagged = namespace["results"][method]
        reference = TorchScorer(bundle, dtype="float64").score(x_raw, method)
        np.testing.assert_allclose(scores, reference.score, rtol=1e-7 if method == "projected" else 1e-10)
        np.testing.assert_array_equal(p_values, reference.p_value)
        np.testing.assert_array_equal(flagged, reference.is_anomaly)
