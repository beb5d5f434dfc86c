"""Back-pressure: beyond the queue limit, fast 503s with Retry-After; the admitted succeed."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from app.api.settings import Settings

from ..conftest import manifold_rows, off_manifold_rows
from .conftest import ready_client
from .test_metrics import scrape, value


def test_more_clients_than_the_queue_admits_get_fast_503s(tiny_bundle):
    client = ready_client(Settings(model_path=tiny_bundle, max_queue=2, scoring_concurrency=1, warmup_rows=4))
    try:
        heavy = {
            "instances": (manifold_rows(3000, seed=1).tolist() + off_manifold_rows(3000, seed=2).tolist()),
            "method": "projected",
        }
        done = threading.Event()
        health: list[int] = []

        def probe() -> None:
            while not done.is_set():
                health.append(client.get("/healthz").status_code)
                time.sleep(0.02)

        prober = threading.Thread(target=probe)
        prober.start()

        def timed_post(_: int) -> tuple[int, float, str | None]:
            start = time.perf_counter()
            response = client.post("/score", json=heavy)
            return response.status_code, time.perf_counter() - start, response.headers.get("retry-after")

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(timed_post, range(8)))
        done.set()
        prober.join()
        ok = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 503]
        assert len(ok) + len(refused) == 8
        assert len(ok) >= 1 and len(refused) >= 1
        assert all(r[2] == "1" for r in refused)
        # a refusal is answered without waiting for the queue: faster than any admitted request
        assert max(r[1] for r in refused) < min(r[1] for r in ok)
        assert health and all(code == 200 for code in health)
        samples = scrape(client)
        assert value(samples, "anomaly_rejected_total") == len(refused)
        assert value(samples, "anomaly_queue_depth") == 0
    finally:
        client.__exit__(None, None, None)


def test_a_request_over_the_time_limit_gets_503(tiny_bundle):
    client = ready_client(Settings(model_path=tiny_bundle, request_timeout_s=0.05, warmup_rows=4))
    try:
        rows = manifold_rows(9000, seed=3).tolist()
        response = client.post("/score", json={"instances": rows, "method": "projected"})
        assert response.status_code == 503 and "did not finish within 0.05 s" in response.json()["error"]
        assert response.headers["retry-after"] == "1"
        assert value(scrape(client), "anomaly_timeouts_total") == 1
        # the service stays healthy and scores small requests as before
        assert client.post("/score", json={"instances": rows[:3]}).status_code == 200
    finally:
        client.__exit__(None, None, None)
