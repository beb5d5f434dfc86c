"""The backends behind create_scorer: the onnx scorer against the torch scorer, row blocks scored in
parallel, and the onnx serving path free of PyTorch."""

import shutil

import numpy as np
import pytest

from app.bundle.format import BundleError, load_bundle
from app.engine.errors import ScoringFailed
from app.engine.onnx_backend import OnnxScorer
from app.engine.torch_backend import TorchScorer

from ..conftest import manifold_rows, replace_bundle_file
from ..tolerances import FLOAT64_PROJECTION_RTOL, float32_rtol


def test_onnx_scorer_matches_the_torch_scorer():
    bundle = load_bundle("models/default")
    x = manifold_rows(5, seed=0)[:, :1].repeat(30, axis=1) * 10
    onnx_scorer, torch_scorer = OnnxScorer(bundle), TorchScorer(bundle)
    for method, rtol in (
        ("likelihood", float32_rtol(bundle.architecture)),
        ("projected", FLOAT64_PROJECTION_RTOL),
    ):
        a, b = onnx_scorer.score(x, method, explain=True), torch_scorer.score(x, method, explain=True)
        np.testing.assert_allclose(a.score, b.score, rtol=rtol)
        np.testing.assert_array_equal(a.is_anomaly, b.is_anomaly)
        np.testing.assert_allclose(a.residual_share, b.residual_share, rtol=rtol, atol=rtol)


def test_the_onnx_scorer_runs_only_the_graphs_the_bundles_weights_give(tmp_path):
    # Another method's graph in the likelihood file, hashes and version recomputed: the checks of
    # each tampering are tests/bundle/test_graphs.py's; here, that a load or a reload refuses it.
    root = tmp_path / "model"
    shutil.copytree("models/default", root)
    replace_bundle_file(root, "scoring-likelihood.onnx", (root / "scoring-latent.onnx").read_bytes())
    with pytest.raises(BundleError, match=r"the 'likelihood' graph is not the graph the exporter builds"):
        OnnxScorer(load_bundle(root))


def test_the_onnx_service_path_never_imports_torch():
    program = """
import sys, time
from pathlib import Path
from app.engine.host import HostOptions, ModelHost
from app.api.settings import Settings
bundle = Path("models/default")
served = ModelHost(HostOptions(bundle, backend="onnx", warmup_rows=16)).prepare(bundle)
for method in served.scorer.methods:
    served.scorer.score([[1.0] * 30], method)
from app.api.main import create_app
create_app(Settings(backend="onnx"))
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:5]
print("ok")
"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_row_blocks_scored_in_parallel_come_back_whole_and_in_order(monkeypatch):
    bundle = load_bundle("models/default")
    rng = np.random.default_rng(3)
    # 3 blocks of unequal size: 334, 334, 333 rows
    x = bundle.scaler.mean + rng.standard_normal((1001, len(bundle.features))) * bundle.scaler.scale
    blocked, whole = OnnxScorer(bundle, threads=3), OnnxScorer(bundle, threads=1)
    sizes: list[int] = []
    fetched: list[list[str]] = []
    session = blocked.sessions["likelihood"]
    run = session.run

    def recorded(names, feed):
        sizes.append(len(feed["x"]))
        fetched.append(names)
        return run(names, feed)

    monkeypatch.setattr(session, "run", recorded)
    a, b = blocked.score(x, "likelihood", explain=True), whole.score(x, "likelihood", explain=True)
    assert sorted(sizes) == [333, 334, 334]
    rtol = float32_rtol(bundle.architecture)
    for name, column in a.columns([]).items():
        # a row's figures do not depend on its neighbours, up to the GEMM kernels' blocking
        np.testing.assert_allclose(column, b.columns([])[name], rtol=rtol, atol=rtol, err_msg=name)
    np.testing.assert_allclose(a.residual_share, b.residual_share, rtol=rtol, atol=rtol)
    assert all("residual" in names for names in fetched)
    # too few rows for a second block: one call; without an explanation the (rows, d) residual,
    # most of what a call would copy out, is not fetched
    sizes.clear()
    fetched.clear()
    blocked.score(x[:200], "likelihood")
    assert sizes == [200] and fetched and not any("residual" in names for names in fetched)


def test_a_score_that_is_not_a_number_ranks_above_every_calibration_score(tiny_bundle, monkeypatch):
    """Arithmetic that overflows on a row far outside the data gives a NaN score: flagged, with the
    p-value of a score above all n calibration scores, 1/(n + 1), so that flagged <=> p <= fpr holds."""
    bundle = load_bundle(tiny_bundle)
    scorer = OnnxScorer(bundle, threads=1)
    x = manifold_rows(3, seed=2)
    run = scorer._run

    def overflowed(*a):
        out = run(*a)
        return out | {"log_prob": np.where(np.arange(3) == 1, np.nan, out["log_prob"])}

    monkeypatch.setattr(scorer, "_run", overflowed)
    out = scorer.score(x, "likelihood")
    n = bundle.calibration["likelihood"].size
    assert np.isnan(out.score[1]) and out.is_anomaly[1]
    assert out.p_value[1] == 1 / (n + 1)
    assert np.array_equal(out.is_anomaly, out.p_value <= out.threshold.fpr)


def test_every_scoring_call_checks_one_output_row_per_input_row(tiny_bundle, monkeypatch):
    """Defect 6: a graph answering n-1 rows was served (1 score for 2 rows with HTTP 200). Whatever
    a backend returns, assemble refuses outputs that do not have one entry per input row."""
    scorer = OnnxScorer(load_bundle(tiny_bundle), threads=1)
    x = manifold_rows(4, seed=1)
    assert scorer.score(x, "likelihood").score.shape == (4,)
    run = scorer._run
    monkeypatch.setattr(scorer, "_run", lambda *a: {name: out[:-1] for name, out in run(*a).items()})
    with pytest.raises(ScoringFailed, match=r"returned log_prob of shape \(3,\) for 4 rows") as failed:
        scorer.score(x, "likelihood")
    assert failed.value.status == 500
    monkeypatch.setattr(
        scorer, "_run", lambda *a: {name: o[:, :1] if o.ndim == 2 else o for name, o in run(*a).items()}
    )
    with pytest.raises(ScoringFailed, match=r"residual of shape \(4, 1\)"):
        scorer.score(x, "likelihood", explain=True)
