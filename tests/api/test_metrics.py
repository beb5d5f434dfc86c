"""/metrics moves by exactly what was sent, and probes are not counted as scoring traffic."""

import json

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.api.settings import Settings
from app.bundle.format import load_bundle

from ..conftest import manifold_rows, off_manifold_rows
from .conftest import ready_client


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, metric, **labels) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture()
def fresh(tiny_bundle):
    client = ready_client(Settings(model_path=tiny_bundle, warmup_rows=4))
    yield client, load_bundle(tiny_bundle)
    client.__exit__(None, None, None)


def test_counters_move_by_exactly_the_rows_and_requests_sent(fresh):
    client, bundle = fresh
    batches = [np.r_[manifold_rows(n, seed=n), off_manifold_rows(n, seed=n + 1)] for n in (3, 10, 40)]
    before = scrape(client)
    flagged, scores = 0, []
    for rows in batches:
        body = client.post("/score", json={"instances": rows.tolist()}).json()
        flagged += sum(body["is_anomaly"])
        scores.extend(body["scores"])
    client.post("/score", json={"instances": [[1.0]]})  # a 422
    client.post("/score", json={"instances": batches[0].tolist(), "method": "reconstruction"})
    for _ in range(3):
        client.get("/healthz"), client.get("/readyz"), client.get("/metrics")
    after = scrape(client)

    def delta(metric, **labels):
        return value(after, metric, **labels) - value(before, metric, **labels)

    rows = sum(len(b) for b in batches)
    default, method = bundle.default_method, "reconstruction"
    assert (
        delta("anomaly_rows_scored_total", model=bundle.name, version=bundle.version, method=default) == rows
    )
    assert delta("anomaly_rows_scored_total", model=bundle.name, version=bundle.version, method=method) == 6
    assert delta("anomaly_requests_total", endpoint="/score", code="200") == 4
    assert delta("anomaly_requests_total", endpoint="/score", code="422") == 1
    assert delta("anomaly_request_duration_seconds_count", endpoint="/score") == 5
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert all(dict(labels).get("endpoint") != probe for _, labels in after)
    assert delta("anomaly_batch_rows_count") == 4 and delta("anomaly_batch_rows_sum") == rows + 6
    threshold = bundle.threshold(default, bundle.default_fpr)
    assert delta("anomaly_flagged_total", threshold=threshold.name) == flagged
    # the score histogram sees the default method's rows only, bucketed at calibration quantiles
    assert delta("anomaly_score_count") == rows
    assert delta("anomaly_score_sum") == pytest.approx(sum(scores), rel=1e-9)
    edges = sorted(
        float(dict(labels)["le"])
        for name, labels in after
        if name == "anomaly_score_bucket" and dict(labels)["le"] != "+Inf"
    )
    cal = bundle.calibration[default]
    assert edges == pytest.approx(np.unique(np.quantile(cal, [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99])))
    for edge in edges:
        expected = sum(s <= edge for s in scores)
        assert delta("anomaly_score_bucket", le=repr(edge)) == expected


def test_gauges_describe_the_model_and_its_thresholds(fresh):
    client, bundle = fresh
    samples = scrape(client)
    assert value(samples, "anomaly_model_info", name=bundle.name, version=bundle.version) == 1
    for fpr in bundle.fprs:
        t = bundle.threshold(bundle.default_method, fpr)
        assert value(samples, "anomaly_threshold", threshold=t.name) == pytest.approx(t.value)
        assert value(samples, "anomaly_threshold_fpr", threshold=t.name) == fpr
    assert client.get("/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")
    assert json.loads(client.get("/readyz").text)["model"]["version"] == bundle.version
