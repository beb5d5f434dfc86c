"""Coalesced scoring: concurrent requests merged, each answered exactly its own rows."""

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app.api.settings import Settings
from app.bundle.format import load_bundle
from app.engine.torch_backend import TorchScorer

from ..conftest import manifold_rows, off_manifold_rows
from ..tolerances import float32_rtol
from .conftest import ready_client
from .test_metrics import scrape, value


def slowed(client, seconds: float) -> Callable[[], None]:
    """Make the served scorer sleep `seconds` before each call; returns what undoes it."""
    scorer = client.app.state.service.host.served.scorer
    original = scorer.score

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    scorer.score = slow
    return lambda: setattr(scorer, "score", original)


def test_concurrent_requests_are_merged_and_each_gets_its_own_rows(tiny_bundle):
    settings = Settings(
        model_path=tiny_bundle,
        coalesce=True,
        coalesce_wait_ms=200,
        coalesce_max_rows=10_000,
        inline_rows=0,
        warmup_rows=4,
    )
    client = ready_client(settings)
    # A request arriving while no call runs is scored at once: calls that take a while make the
    # later requests gather behind the running one, whatever the threads' timing.
    restore = slowed(client, 0.3)
    try:
        batches = [
            np.r_[manifold_rows(3 + i, seed=50 + i), off_manifold_rows(2, seed=70 + i)] for i in range(8)
        ]
        with ThreadPoolExecutor(8) as pool:
            responses = list(
                pool.map(
                    lambda rows: client.post("/score", json={"instances": rows.tolist(), "components": True}),
                    batches,
                )
            )
        scorer = TorchScorer(load_bundle(tiny_bundle))
        rtol = float32_rtol(scorer.bundle.architecture)
        for rows, response in zip(batches, responses, strict=True):
            assert response.status_code == 200
            body = response.json()
            expected = scorer.score(rows)
            assert len(body["scores"]) == len(rows)
            # the service's onnx graphs against torch: two float32 implementations
            np.testing.assert_allclose(body["scores"], expected.score, rtol=rtol)
            np.testing.assert_allclose(body["log_volume"], expected.log_volume, rtol=rtol, atol=rtol)
            assert body["is_anomaly"] == expected.is_anomaly.tolist()
        samples = scrape(client)
        merged = value(samples, "anomaly_coalesced_batch_rows_count")
        assert value(samples, "anomaly_coalesced_batch_rows_sum") == sum(len(b) for b in batches)
        assert 1 <= merged < len(batches)  # at least two requests shared a batch
        assert value(samples, "anomaly_coalesce_queue_seconds_count") == len(batches)
        restore()
        # different options are never merged: each still gets its own method's scores
        a = client.post("/score", json={"instances": batches[0].tolist(), "method": "latent"}).json()
        assert a["method"] == "latent"
        np.testing.assert_allclose(a["scores"], scorer.score(batches[0], "latent").score, rtol=rtol)
    finally:
        client.__exit__(None, None, None)


def test_with_coalescing_a_slow_scorer_answers_503_at_the_time_limit(tiny_bundle):
    # Coalesced batches used to call the thread pool directly: past the limit, past the permits.
    client = ready_client(
        Settings(model_path=tiny_bundle, coalesce=True, request_timeout_s=0.2, inline_rows=0, warmup_rows=4)
    )
    try:
        restore = slowed(client, 1.0)
        start = time.perf_counter()
        response = client.post("/score", json={"instances": manifold_rows(3, seed=5).tolist()})
        elapsed = time.perf_counter() - start
        assert response.status_code == 503, response.text
        assert "did not finish within 0.2 s" in response.json()["error"]
        assert elapsed < 0.9 and value(scrape(client), "anomaly_timeouts_total") == 1
        restore()
        time.sleep(1.0)  # the abandoned call finishes and gives its permit back
        assert client.post("/score", json={"instances": manifold_rows(3, seed=6).tolist()}).status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_merged_batches_grow_to_65536_rows_only_for_torch_on_a_gpu(tiny_bundle, monkeypatch):
    import torch

    from app.api.service import CPU_COALESCE_ROWS, GPU_COALESCE_ROWS, coalesce_rows

    def rows(**options) -> int:
        return coalesce_rows(Settings(model_path=tiny_bundle, **options))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rows() == rows(backend="torch") == rows(backend="torch", device="auto") == CPU_COALESCE_ROWS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rows(backend="torch") == rows(backend="torch", device="cuda:0") == GPU_COALESCE_ROWS
    assert rows(backend="torch", device="cpu") == rows() == CPU_COALESCE_ROWS  # onnx runs on the CPU
    assert rows(backend="torch", coalesce_max_rows=100) == 100  # a setting wins
