"""POST /score, /model, health and OpenAPI against a tiny bundle, through the real ASGI app."""

import numpy as np
import pytest
import torch

from app.api.settings import Settings
from app.bundle import calibration
from app.bundle.format import load_bundle
from app.engine.torch_backend import TorchScorer
from app.model.methods import METHODS

from ..conftest import FEATURES, manifold_rows, off_manifold_rows
from ..tolerances import float32_rtol
from .conftest import ready_client

ROWS = np.r_[manifold_rows(20, seed=21), off_manifold_rows(10, seed=22)]


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


def test_scores_equal_the_scorer_in_request_order(client, bundle):
    response = client.post("/score", json={"instances": ROWS.tolist()})
    assert response.status_code == 200
    body = response.json()
    expected = TorchScorer(bundle).score(ROWS)
    assert body["model"] == {"name": bundle.name, "version": bundle.version}
    assert body["method"] == bundle.default_method
    t = bundle.threshold(bundle.default_method, bundle.default_fpr)
    assert body["threshold"] == {"name": t.name, "fpr": t.fpr, "value": pytest.approx(t.value)}
    # the service scores with the onnx graphs: two float32 implementations
    np.testing.assert_allclose(body["scores"], expected.score, rtol=float32_rtol(bundle.architecture))
    np.testing.assert_allclose(body["log_likelihood"], -np.asarray(body["scores"]), rtol=1e-12)
    np.testing.assert_allclose(body["p_values"], expected.p_value, rtol=1e-12)
    assert body["is_anomaly"] == expected.is_anomaly.tolist()
    assert "log_prior" not in body and "explain" not in body


def test_rows_by_name_in_any_key_order_equal_rows_by_position(client):
    named = [dict(reversed(list(zip(FEATURES, row, strict=True)))) for row in ROWS.tolist()]
    by_name = client.post("/score", json={"instances": named}).json()
    by_position = client.post("/score", json={"instances": ROWS.tolist()}).json()
    assert by_name["scores"] == by_position["scores"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_with_components_adds_up(client, method):
    body = client.post(
        "/score", json={"instances": ROWS.tolist(), "method": method, "components": True}
    ).json()
    assert body["method"] == method
    total = np.asarray(body["log_prior"]) + np.asarray(body["log_volume"]) + np.asarray(body["log_residual"])
    np.testing.assert_allclose(total, body["log_likelihood"], rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(body["reconstruction_error"]) >= 0)


def test_thresholds_by_name_and_by_rate_flag_exactly_the_small_p_values(client, bundle):
    for fpr in bundle.fprs:
        by_rate = client.post("/score", json={"instances": ROWS.tolist(), "threshold": fpr}).json()
        by_name = client.post("/score", json={"instances": ROWS.tolist(), "threshold": f"fpr_{fpr:g}"}).json()
        assert by_rate == by_name
        assert by_rate["threshold"]["value"] == pytest.approx(
            bundle.threshold(bundle.default_method, fpr).value
        )
        assert by_rate["is_anomaly"] == [p <= fpr for p in by_rate["p_values"]]


def test_explain_gives_each_features_share_of_the_residual_term(client, bundle):
    """Each feature's (x_j - x'_j)^2 / w_j over their sum: its share of what the residual term charges."""
    body = client.post("/score", json={"instances": ROWS.tolist(), "explain": True}).json()
    assert body["explain"]["features"] == FEATURES
    share = np.asarray(body["explain"]["residual_share"])
    model = bundle.build_model()
    with torch.no_grad():
        x = torch.tensor(bundle.scaler.transform(ROWS), dtype=torch.float32)
        e2 = ((x - model.decoder(model.encoder(x))) ** 2).double().numpy()
    assert bundle.relative_variance is not None  # one noise variance per feature, as trained by default
    e2 = e2 / np.asarray(bundle.relative_variance)
    rtol = float32_rtol(bundle.architecture)
    np.testing.assert_allclose(share, e2 / e2.sum(1, keepdims=True), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(share.sum(1), 1.0, rtol=1e-9)


def test_model_metadata(client, bundle):
    body = client.get("/model").json()
    assert body["features"] == FEATURES and body["version"] == bundle.version
    assert body["methods"] == list(METHODS) and body["default_threshold"] == f"fpr_{bundle.default_fpr:g}"
    assert set(body["thresholds"]) == set(METHODS)
    assert body["training"]["selection"].startswith("unsupervised")


def test_health_ready_and_request_id(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    echoed = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    for hostile in ("\x1b[31mred", "caf\u00e9", "  ", "x" * 129):  # escapes, non-ASCII, blank, too long
        replaced = client.get("/healthz", headers={"X-Request-ID": hostile.encode("latin-1")})
        assert len(replaced.headers["x-request-id"]) == 32, hostile
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32 and generated != client.get("/healthz").headers["x-request-id"]


def test_openapi_documents_score_with_examples(client):
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/score"]["post"]
    content = operation["requestBody"]["content"]["application/json"]
    assert set(content["examples"]) == {"rows", "named"}
    assert "instances" in content["schema"]["properties"]
    assert "example" in operation["responses"]["200"]["content"]["application/json"]
    assert {"400", "401", "413", "415", "422", "503"} <= set(operation["responses"])
    assert "swagger" in client.get("/docs").text.lower()


def test_small_requests_are_scored_on_the_loop_and_answer_as_in_a_thread(tiny_bundle):
    """inline_rows decides the path, never the answer."""
    rows = np.r_[manifold_rows(30, seed=91), off_manifold_rows(10, seed=92)]
    answers, threaded_calls = {}, {}
    for inline in (0, 16):
        client = ready_client(Settings(model_path=tiny_bundle, inline_rows=inline, warmup_rows=4))
        try:
            scheduler = client.app.state.service.scheduler
            calls = []
            original = scheduler._threaded

            async def counting(fn, *args, original=original, calls=calls):
                calls.append(args[0].shape[0])
                return await original(fn, *args)

            scheduler._threaded = counting
            answers[inline] = [
                client.post("/score", json={"instances": part.tolist(), "components": True}).json()
                for part in (rows[:5], rows)
            ]
            threaded_calls[inline] = calls
        finally:
            client.__exit__(None, None, None)
    assert threaded_calls == {0: [5, 40], 16: [40]}
    assert answers[0] == answers[16]


def test_any_rate_the_calibration_resolves_is_a_threshold_on_the_spot(client, tiny_bundle):
    """Issue 17: thresholds existed only at the rates chosen at training time. Any rate >= 1/n now
    gives the threshold and flags of app.bundle.calibration's rule on the stored scores."""
    bundle = load_bundle(tiny_bundle)
    rows = np.r_[manifold_rows(20, seed=31), off_manifold_rows(20, seed=32)]
    scores_sorted = bundle.calibration["likelihood"]
    for threshold, rate in ((0.05, 0.05), ("fpr_0.05", 0.05), (0.25, 0.25), (0.1, 0.1)):
        body = client.post("/score", json={"instances": rows.tolist(), "threshold": threshold}).json()
        expected = calibration.threshold(scores_sorted, rate)
        assert body["threshold"] == {"name": calibration.threshold_name(rate), "fpr": rate, "value": expected}
        assert body["is_anomaly"] == [s > expected for s in body["scores"]]
        assert body["is_anomaly"] == [p <= rate for p in body["p_values"]]
    # Re-audit: the name of an uncalibrated rate must give the rate back. %g's six digits named 1/n
    # below 1/n, and sending that name back was refused.
    n = scores_sorted.size
    body = client.post("/score", json={"instances": rows.tolist(), "threshold": 1 / n}).json()
    assert body["threshold"]["fpr"] == 1 / n and body["threshold"]["name"] == f"fpr_{1 / n!r}"
    again = client.post("/score", json={"instances": rows.tolist(), "threshold": body["threshold"]["name"]})
    assert again.status_code == 200 and again.json()["threshold"] == body["threshold"]


def test_ids_are_echoed_beside_the_scores_never_scored(client):
    """Issue 17: results matched inputs only by position, and named rows with an id key were 422."""
    rows = manifold_rows(3, seed=61)
    plain = client.post("/score", json={"instances": rows.tolist()}).json()
    with_ids = client.post("/score", json={"instances": rows.tolist(), "ids": ["a", 7, "c"]}).json()
    assert with_ids["ids"] == ["a", 7, "c"] and with_ids["scores"] == plain["scores"]
    named = [
        dict(zip(FEATURES, r, strict=True)) | {"sample_id": f"S{i}"} for i, r in enumerate(rows.tolist())
    ]
    keyed = client.post("/score", json={"instances": named, "id_key": "sample_id"}).json()
    assert keyed["ids"] == ["S0", "S1", "S2"] and keyed["scores"] == plain["scores"]
    extreme = client.post("/score", json={"instances": rows.tolist(), "ids": [2**63 - 1, -(2**63), 0]}).json()
    assert extreme["ids"] == [2**63 - 1, -(2**63), 0]
    assert "ids" not in plain
    for body, fragment in (
        ({"instances": rows.tolist(), "ids": ["a"]}, "one id per row (3)"),
        (
            {"instances": rows.tolist(), "ids": ["a", True, "c"]},
            "ids[1], an id, must be a string or a 64-bit",
        ),
        # The audit's 500: an integer orjson cannot write back, refused before anything is scored.
        ({"instances": rows.tolist(), "ids": ["a", 2**63, "c"]}, "ids[1], an id, must be a string or a 64-"),
        # 400 digits: beyond what orjson reads at all, so Python's parser reads it exactly.
        ({"instances": rows.tolist(), "ids": ["a", "b", int("7" * 400)]}, "ids[2], an id, must be a string"),
        (
            {"instances": [*named[:2], named[2] | {"sample_id": 2**63 + 5}], "id_key": "sample_id"},
            "instances[2]['sample_id'], an id, must be a string or a 64-bit integer, got an integer beyond",
        ),
        (
            {"instances": [named[0] | {"sample_id": 1.5}, *named[1:]], "id_key": "sample_id"},
            "instances[0]['sample_id'], an id, must be a string or a 64-bit integer, got float 1.5",
        ),
        ({"instances": rows.tolist(), "id_key": "sample_id"}, "with rows as objects"),
        ({"instances": named, "id_key": "other"}, "has no 'other', the declared id_key"),
        ({"instances": named}, "unknown features ['sample_id']"),
    ):
        response = client.post("/score", json=body)
        assert response.status_code == 422 and fragment in response.json()["error"], response.text
