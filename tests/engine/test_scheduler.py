"""The scheduler's rules hold on every path: the time limit, the permits, the queue bound, the drain.
A fake scorer that sleeps stands in for a slow model; no transport is involved."""

import asyncio
import threading
import time

import numpy as np
import pytest

from app.bundle.format import EnsembleBundle, Threshold
from app.engine.errors import Overloaded
from app.engine.events import NoEvents
from app.engine.onnx_backend import OnnxScorer
from app.engine.scheduler import Scheduler, SchedulerOptions
from app.engine.scorer import ScoreOutput

from ..conftest import manifold_rows, with_constants


class SlowScorer:
    backend, methods = "fake", ("likelihood", "latent")
    bundle = None  # a single model's scorer as far as the scheduler asks

    def __init__(self, seconds: float) -> None:
        self.seconds, self.running, self.most, self.calls = seconds, 0, 0, []
        self.lock = threading.Lock()

    def score(self, x, method=None, fpr=None, explain=False):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls.append(len(x))
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        n = len(x)
        values = x[:, 0].astype(np.float64)
        return ScoreOutput(
            method, Threshold("fpr_0.1", method, 0.1, 0.0), values, -values, *(np.zeros(n),) * 5,
            np.zeros(n, bool), None, np.zeros((n, 0), bool),
        )  # fmt: skip


class Counted(NoEvents):
    def __init__(self) -> None:
        self.timeouts = self.rejections = 0

    def timed_out(self) -> None:
        self.timeouts += 1

    def rejected(self) -> None:
        self.rejections += 1


def rows(n: int, first: float = 0.0) -> np.ndarray:
    return np.arange(first, first + n, dtype=np.float64)[:, None].repeat(3, axis=1)


@pytest.mark.parametrize("coalesce", [None, 4096], ids=["threaded", "coalesced"])
def test_a_slow_call_answers_overloaded_at_the_time_limit_and_is_drained(coalesce):
    async def run():
        events = Counted()
        scheduler = Scheduler(
            SchedulerOptions(timeout_s=0.2, inline_rows=0, coalesce_max_rows=coalesce), events
        )
        scorer = SlowScorer(1.0)
        start = time.perf_counter()
        with pytest.raises(Overloaded, match=r"did not finish within 0\.2 s"):
            await scheduler.score(scorer, rows(5), "likelihood", None, False)
        answered = time.perf_counter() - start
        assert 0.2 <= answered < 0.6  # at the limit, not when the scorer finishes
        assert events.timeouts == 1
        # the abandoned call still holds its permit and is what the drain waits for
        assert len(scheduler.running) == 1 and scheduler.permits._value == 1
        await scheduler.drain(5.0)
        assert not scheduler.running and scheduler.permits._value == 2
        assert time.perf_counter() - start >= 1.0

    asyncio.run(run())


def test_coalesced_batches_share_the_permits_with_every_other_call():
    # concurrency 1: two batches with different options (so never merged) never run at once
    async def run():
        scheduler = Scheduler(
            SchedulerOptions(concurrency=1, inline_rows=0, coalesce_max_rows=4096, coalesce_wait_s=0.01)
        )
        scorer = SlowScorer(0.1)
        results = await asyncio.gather(
            *(
                scheduler.score(scorer, rows(2, 10 * i), m, None, False)
                for i, m in enumerate(["likelihood"] * 3 + ["latent"] * 3)
            )
        )
        assert scorer.most == 1 and sorted(scorer.calls) == [6, 6]
        for i, out in enumerate(results):  # each request gets exactly its own rows back
            np.testing.assert_array_equal(out.score, rows(2, 10 * i)[:, 0])

    asyncio.run(run())


def test_a_lone_coalesced_request_waits_for_nothing_and_later_ones_gather_behind_a_running_call():
    # A wait far longer than the test: a request that waited for it would show.
    async def run():
        scheduler = Scheduler(
            SchedulerOptions(concurrency=2, inline_rows=0, coalesce_max_rows=4096, coalesce_wait_s=30.0)
        )
        scorer = SlowScorer(0.3)
        start = time.perf_counter()
        first = asyncio.ensure_future(scheduler.score(scorer, rows(2), "likelihood", None, False))
        await asyncio.sleep(0.1)  # the first is running alone; these three gather behind it
        later = [scheduler.score(scorer, rows(2, 10 * i), "likelihood", None, False) for i in (1, 2, 3)]
        results = await asyncio.gather(first, *later)
        elapsed = time.perf_counter() - start
        # one call of 2 rows at once, then one of the 6 gathered as soon as it ended: about 0.6 s
        assert scorer.calls == [2, 6] and elapsed < 5.0, (scorer.calls, elapsed)
        for out, first_row in zip(results, (0, 10, 20, 30), strict=True):
            np.testing.assert_array_equal(out.score, rows(2, first_row)[:, 0])
        assert scheduler.in_flight == {} and scheduler.groups == {}

    asyncio.run(run())


def test_the_drain_waits_for_merged_batches_still_waiting_for_a_permit():
    async def run():
        scheduler = Scheduler(
            SchedulerOptions(concurrency=1, inline_rows=0, coalesce_max_rows=4096, coalesce_wait_s=0.0)
        )
        scorer = SlowScorer(0.3)
        requests = [
            asyncio.ensure_future(scheduler.score(scorer, rows(2), m, None, False))
            for m in ("likelihood", "latent")
        ]
        await asyncio.sleep(0.05)  # both batches flushed: one running, one waiting for the permit
        assert len(scheduler.running) == 1 and len(scheduler.flushes) == 2
        await scheduler.drain(5.0)
        assert scorer.calls == [2, 2] and all(r.done() and not r.exception() for r in requests)

    asyncio.run(run())


def test_beyond_the_queue_bound_requests_are_refused_at_once():
    async def run():
        events = Counted()
        scheduler = Scheduler(SchedulerOptions(max_queue=2), events)
        async with scheduler.admission(), scheduler.admission():
            with pytest.raises(Overloaded, match="2 scoring requests already queued; the limit is 2"):
                async with scheduler.admission():
                    pass
            assert scheduler.admitted == 2
        assert scheduler.admitted == 0 and events.rejections == 1

    asyncio.run(run())


def test_small_batches_are_scored_inline_and_large_ones_in_a_thread():
    async def run():
        scheduler = Scheduler(SchedulerOptions(inline_rows=4))
        scorer, caller = SlowScorer(0.0), threading.get_ident()
        threads = []
        original = scorer.score
        scorer.score = lambda *a: threads.append(threading.get_ident()) or original(*a)
        await scheduler.score(scorer, rows(4), "likelihood", None, False)
        await scheduler.score(scorer, rows(5), "likelihood", None, False)
        await scheduler.score(scorer, rows(2), "projected", None, False)  # float64, many iterations
        assert threads[0] == caller and threads[1] != caller and threads[2] != caller

    asyncio.run(run())


def test_an_ensembles_small_calls_are_scored_inline_as_a_single_models_are(ensemble_result):
    """One onnxruntime call scores every member and combines them; at a few rows its fixed cost
    dominates, and in a thread the loop waited for it (app.engine.scheduler's docstring)."""
    bundle = ensemble_result.bundle
    assert isinstance(bundle, EnsembleBundle)

    async def run():
        scheduler = Scheduler(SchedulerOptions(inline_rows=16))
        scorer, caller = OnnxScorer(bundle, threads=1), threading.get_ident()
        threads = []
        original = scorer.score
        scorer.score = lambda *a: threads.append(threading.get_ident()) or original(*a)
        for n in (1, 16, 17):
            x = with_constants(manifold_rows(n, seed=5))
            out = await scheduler.score(scorer, x, "likelihood", None, False)
            assert out.score.shape == (n,)
        assert threads[:2] == [caller, caller] and threads[2] != caller

    asyncio.run(run())
