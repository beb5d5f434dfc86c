"""/metrics moves by exactly what was sent, and probes are not counted as scoring traffic."""

import json
import os
import sys
import time
from pathlib import Path

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
    assert delta("anomaly_flagged_total", threshold=threshold.name, method=default) == flagged
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


def test_flagged_rows_are_counted_per_method_and_threshold(fresh):
    client, bundle = fresh
    default, other_method = bundle.default_method, "reconstruction"
    calibrated = bundle.threshold(default, max(bundle.fprs)).name  # the widest: it flags rows here
    assert 0.3 not in bundle.fprs and 0.25 not in bundle.fprs  # uncalibrated: threshold="other"
    # Rows far from all of the training rows (+30 in every feature, ten of their spreads), so that each
    # series gets flagged rows whatever the small model learned; the off-manifold rows alone, 3 away,
    # were not always flagged by it.
    rows = np.r_[
        manifold_rows(20, seed=5), off_manifold_rows(10, seed=6), manifold_rows(10, seed=7) + 30
    ].tolist()
    requests = [
        {"threshold": calibrated},
        {"threshold": calibrated, "method": other_method},
        {"threshold": 0.3, "method": other_method},
        {"threshold": 0.3},
        {"threshold": 0.25},  # another uncalibrated rate: the same series
        {"method": other_method},  # the default rate: a series at 0 or more
    ]
    before = scrape(client)
    expected: dict[tuple[str, str], int] = {}
    for options in requests:
        body = client.post("/score", json={"instances": rows, **options}).json()
        method = options.get("method", default)
        fpr = max(bundle.fprs) if "threshold" in options else bundle.default_fpr
        label = "other" if isinstance(options.get("threshold"), float) else bundle.threshold(method, fpr).name
        expected[label, method] = expected.get((label, method), 0) + sum(body["is_anomaly"])
    after = scrape(client)
    # every series the assertion below tells apart has rows in it
    for key in (
        (calibrated, default),
        (calibrated, other_method),
        ("other", default),
        ("other", other_method),
    ):
        assert expected[key] > 0, key
    flagged = {
        (dict(labels)["threshold"], dict(labels)["method"]): v - before.get((name, labels), 0.0)
        for (name, labels), v in after.items()
        if name == "anomaly_flagged_total"
    }
    assert {k: v for k, v in flagged.items() if v} == {k: v for k, v in expected.items() if v}
    assert all(
        set(dict(labels)) == {"threshold", "method"} for n, labels in after if n == "anomaly_flagged_total"
    )


def test_reload_results_are_exported_at_zero_before_any_reload(fresh):
    """increase() never counts a counter's first sample, so a failure series born at 1 would keep the
    ReloadFailed alert silent: both series exist from start-up."""
    client, _ = fresh
    samples = scrape(client)
    for result in ("success", "failure"):
        assert (("anomaly_reloads_total", (("result", result),))) in samples
        assert value(samples, "anomaly_reloads_total", result=result) == 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process metrics are read from /proc")
def test_process_and_interpreter_metrics_come_with_the_apps_own(fresh):
    client, _ = fresh
    samples = scrape(client)
    rss = value(samples, "process_resident_memory_bytes")
    assert 10 * 2**20 < rss <= value(samples, "process_virtual_memory_bytes")  # numpy and a model loaded
    open_fds, max_fds = value(samples, "process_open_fds"), value(samples, "process_max_fds")
    assert 3 <= open_fds <= max_fds  # stdin, stdout, stderr at least
    assert open_fds == pytest.approx(len(os.listdir("/proc/self/fd")), abs=20)  # TestClient: this process
    cpu = value(samples, "process_cpu_seconds_total")
    assert 0 < cpu <= time.process_time() + 1
    start = value(samples, "process_start_time_seconds")
    assert time.time() - 86400 < start <= time.time()
    client.post("/score", json={"instances": manifold_rows(2000, seed=9).tolist()})
    assert value(scrape(client), "process_cpu_seconds_total") >= cpu
    version = sys.version_info
    assert (
        value(
            samples,
            "python_info",
            implementation=sys.implementation.name.replace("cpython", "CPython"),
            major=str(version.major),
            minor=str(version.minor),
            patchlevel=str(version.micro),
            version=f"{version.major}.{version.minor}.{version.micro}",
        )
        == 1
    )
    assert ("python_gc_collections_total", (("generation", "0"),)) in samples


def test_a_response_to_a_client_that_has_gone_is_counted_499_and_not_raised():
    """Hostile-client audit: a client that closed its connection mid-pipeline made uvloop refuse
    the response's write (RuntimeError, 'the handler is closed'), which reached the error handler,
    logged a traceback as an unhandled error and was counted 200. Now a 499, and nothing raised."""
    import asyncio

    from prometheus_client import generate_latest

    from app.api.logs import RequestLogMiddleware
    from app.api.metrics import Metrics

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def gone(message):  # type: ignore[no-untyped-def]
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    async def broken(message):  # type: ignore[no-untyped-def]
        raise RuntimeError("Expected ASGI message 'http.response.body'")  # a bug: still raised

    metrics = Metrics()
    middleware = RequestLogMiddleware(app, metrics)
    scope = {"type": "http", "method": "GET", "path": "/model", "headers": []}
    asyncio.run(middleware(scope, None, gone))
    with pytest.raises(RuntimeError, match="Expected ASGI"):
        asyncio.run(middleware(scope, None, broken))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }
    assert value(samples, "anomaly_requests_total", endpoint="/model", code="499") == 1
    assert value(samples, "anomaly_requests_total", endpoint="/model", code="200") == 1
