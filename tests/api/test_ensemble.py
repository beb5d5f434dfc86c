"""An ensemble bundle over HTTP (issue 16): /model describes its members, /score and /v2 answer with
the members' mean score, the p-values of the ensemble's calibration and the members' mean parts,
exactly as the scorer computes them."""

import numpy as np
import pytest

from app.api.settings import Settings
from app.engine.onnx_backend import OnnxScorer

from ..conftest import CONSTANT_COLUMNS, manifold_rows, off_manifold_rows, with_constants
from .conftest import ready_client
from .test_open_inference import decode, tensor

ROWS = with_constants(np.vstack([manifold_rows(3, seed=60), off_manifold_rows(2, seed=61)]))


@pytest.fixture(scope="module")
def served(ensemble_result):
    bundle = ensemble_result.bundle
    c = ready_client(Settings(model_path=bundle.path, max_rows=100, warmup_rows=4))
    yield c, bundle
    c.__exit__(None, None, None)


def test_model_metadata_describes_the_members(served):
    client, bundle = served
    body = client.get("/model").json()
    assert body["architecture"] is None and body["noise"] is None
    assert body["ensemble"]["combination"] == "factor_fisher_tail"
    members = body["ensemble"]["members"]
    assert [m["architecture"]["latent_dim"] for m in members] == [2, 2, 3]
    assert [m["noise"]["sigma2"] for m in members] == [m.sigma2 for m in bundle.members]
    assert body["columns"] == CONSTANT_COLUMNS


def test_score_answers_the_members_mean_score_and_mean_parts(served):
    client, bundle = served
    response = client.post("/score", json={"instances": ROWS.tolist(), "components": True})
    assert response.status_code == 200
    body = response.json()
    expected = OnnxScorer(bundle).score(ROWS)
    np.testing.assert_array_equal(body["scores"], expected.score)
    np.testing.assert_array_equal(body["p_values"], expected.p_value)
    np.testing.assert_array_equal(body["log_likelihood"], expected.log_likelihood)
    np.testing.assert_array_equal(body["log_volume"], expected.log_volume)
    np.testing.assert_array_equal(body["member_scores"], expected.member_scores)
    np.testing.assert_allclose(np.mean(body["member_scores"], axis=1), body["scores"], rtol=1e-15, atol=0)


def test_the_open_inference_protocol_answers_the_same_scores(served):
    client, bundle = served
    response = client.post("/v2/models/ensemble/infer", json={"inputs": [tensor(ROWS)]})
    assert response.status_code == 200, response.text
    outputs = decode(response)
    expected = OnnxScorer(bundle).score(ROWS)
    np.testing.assert_allclose(outputs["score"], expected.score, rtol=1e-7)  # FP32 on the wire
    np.testing.assert_array_equal(outputs["is_anomaly"], expected.is_anomaly)
