"""The scheduler: every scoring call goes through it, whatever path it takes.

It owns the four things that bound the service's work, as text-embeddings-inference's queue does:
admission (at most `max_queue` requests admitted, the rest refused at once), permits (at most
`concurrency` scoring calls running), the time limit (a request not answered within `timeout_s`
gets Overloaded, 503) and the drain (calls still running are awaited at shutdown).

Three paths, one set of rules:
- threaded: the call runs in a worker thread under a permit, within the time limit;
- coalesced (`coalesce_max_rows` set): requests with the same scorer and options are merged into
  one call, which runs as a threaded call does, as text-embeddings-inference batches: while no
  call of theirs is running, a request is scored at once (with whatever arrived in the same turn
  of the event loop), so a lone request waits for nothing; while one runs, requests gather and
  are scored together when it ends, or once the first has waited `coalesce_wait_s`, or once
  they hold `coalesce_max_rows` rows. Each request still answers within its own time limit;
- inline: batches of at most `inline_rows` rows of a closed-form method are scored on the event
  loop, a single model's (0.13 ms for one row of the shipped model, 0.16 ms for 16) and an
  ensemble's alike (about 0.3 ms for one row of the six-member default, 0.5 ms for 16: every
  member's graph and their combination in one onnxruntime call). They take no permit, so one
  inline call may run beside the `concurrency` threaded ones (onnxruntime releases the GIL), and
  are too short for the time limit to bound. An ensemble's small calls went to a thread until
  session 19, so that the loop could parse while onnxruntime scored on the other core; but a call's
  fixed cost dominates at a few rows, so requests gathered behind each call and the loop waited for
  its answer a quarter of the time (measured in-process, 16 clients: 24% of the wall time in the
  selector), where inline it never waits: 1 940 -> 2 518 requests/s, p99 17.9 -> 13.0 ms (medians
  of six interleaved pairs over HTTP, benchmarks/http_load.py's load, 2026-12-04). The projection
  (float64, up to 100 iterations) always goes to a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from starlette.concurrency import run_in_threadpool

from app.engine.errors import Overloaded
from app.engine.events import Events, NoEvents
from app.engine.scorer import ScoreOutput, Scorer
from app.model.methods import FLOAT64_METHODS

T = TypeVar("T")


@dataclass(frozen=True)
class SchedulerOptions:
    max_queue: int = 64
    concurrency: int = 2
    timeout_s: float = 30.0
    inline_rows: int = 16
    coalesce_max_rows: int | None = None  # None: no coalescing
    coalesce_wait_s: float = 0.002


Key = tuple[int, str, float | None, bool]


@dataclass
class _Waiting:
    x: NDArray[np.float64]
    future: asyncio.Future[ScoreOutput]
    since: float


@dataclass
class _Group:
    scorer: Scorer
    method: str
    fpr: float | None
    explain: bool
    items: list[_Waiting] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.Handle | None = None


class Scheduler:
    def __init__(self, options: SchedulerOptions, events: Events | None = None) -> None:
        self.options = options
        self.events = events or NoEvents()
        self.admitted = 0
        self.permits = asyncio.Semaphore(options.concurrency)
        self.running: set[asyncio.Future[Any]] = set()  # calls in worker threads, for the drain
        self.groups: dict[Key, _Group] = {}
        self.flushes: set[asyncio.Task[None]] = set()
        self.in_flight: dict[Key, int] = {}  # merged calls flushed and not yet answered, per key

    @contextlib.asynccontextmanager
    async def admission(self) -> AsyncIterator[None]:
        """Bounded queue: beyond max_queue requests admitted, Overloaded at once."""
        limit = self.options.max_queue
        if self.admitted >= limit:
            self.events.rejected()
            raise Overloaded(
                f"{self.admitted} scoring requests already queued; the limit is {limit}",
                {"queued": self.admitted, "limit": limit},
                headers={"Retry-After": "1"},
            )
        self.admitted += 1
        self.events.queue_depth(self.admitted)
        try:
            yield
        finally:
            self.admitted -= 1
            self.events.queue_depth(self.admitted)

    async def score(
        self, scorer: Scorer, x: NDArray[np.float64], method: str, fpr: float | None, explain: bool
    ) -> ScoreOutput:
        if self.options.coalesce_max_rows is not None:
            return await self._within_limit(self._coalesced(scorer, x, method, fpr, explain))
        if self._inline(x.shape[0], method):
            return scorer.score(x, method, fpr, explain)
        return await self._within_limit(self._threaded(scorer.score, x, method, fpr, explain))

    def _inline(self, rows: int, method: str) -> bool:
        return rows <= self.options.inline_rows and method not in FLOAT64_METHODS

    async def _within_limit(self, work: Awaitable[T]) -> T:
        limit = self.options.timeout_s
        try:
            async with asyncio.timeout(limit):
                return await work
        except TimeoutError:
            self.events.timed_out()
            raise Overloaded(
                f"scoring did not finish within {limit} s", {"limit_s": limit}, headers={"Retry-After": "1"}
            ) from None

    async def _threaded(self, fn: Callable[..., T], *args: Any) -> T:
        """fn in a worker thread under a permit. A caller that gives up (time limit, client gone)
        leaves the call running: it keeps its permit until its thread finishes, so abandoned work
        still counts against the concurrency it really uses, and the drain waits for it."""
        await self.permits.acquire()
        task = asyncio.ensure_future(run_in_threadpool(fn, *args))
        self.running.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self.permits.release()
        self.running.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that gave up was already answered

    async def _coalesced(
        self, scorer: Scorer, x: NDArray[np.float64], method: str, fpr: float | None, explain: bool
    ) -> ScoreOutput:
        loop = asyncio.get_running_loop()
        key = (id(scorer), method, fpr, explain)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(scorer, method, fpr, explain)
            if self.in_flight.get(key, 0):
                group.timer = loop.call_later(self.options.coalesce_wait_s, self._flush, key)
            else:  # after the requests already ready to run in this turn have joined
                group.timer = loop.call_soon(self._flush, key)
        waiting = _Waiting(x, loop.create_future(), time.perf_counter())
        # A request that gave up never reads its future: mark an error there as seen.
        waiting.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        group.items.append(waiting)
        group.rows += x.shape[0]
        if group.rows >= self.options.coalesce_max_rows:  # type: ignore[operator]
            self._flush(key)
        # shielded: one request giving up must not cancel the others' batch
        return await asyncio.shield(waiting.future)

    def _flush(self, key: Key) -> None:
        group = self.groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        task = asyncio.get_running_loop().create_task(self._run_group(key, group))
        self.flushes.add(task)  # held until done, so the task is not garbage-collected mid-flight
        task.add_done_callback(self.flushes.discard)

    async def _run_group(self, key: Key, group: _Group) -> None:
        try:
            await self._answer_group(group)
        finally:
            self.in_flight[key] -= 1
            if not self.in_flight[key]:
                del self.in_flight[key]
                if key in self.groups:  # what gathered while this call ran goes now
                    self._flush(key)

    async def _answer_group(self, group: _Group) -> None:
        now = time.perf_counter()
        self.events.merged(group.rows, [now - item.since for item in group.items])
        x = np.concatenate([item.x for item in group.items]) if len(group.items) > 1 else group.items[0].x
        args = (x, group.method, group.fpr, group.explain)
        try:
            if self._inline(group.rows, group.method):
                out = group.scorer.score(*args)
            else:
                out = await self._threaded(group.scorer.score, *args)
        except asyncio.CancelledError:  # shutdown: nobody must wait for an answer that never comes
            self._fail(group, Overloaded("scoring was cancelled: the service is shutting down"))
            raise
        except Exception as e:  # each waiting request gets the error its own call would have raised
            self._fail(group, e)
            return
        start = 0
        for item in group.items:
            stop = start + item.x.shape[0]
            if not item.future.done():
                item.future.set_result(out.rows(start, stop))
            start = stop

    @staticmethod
    def _fail(group: _Group, error: BaseException) -> None:
        for item in group.items:
            if not item.future.done():
                item.future.set_exception(error)

    async def drain(self, grace_s: float) -> None:
        """At shutdown: let calls still running finish, and merged batches still waiting for a
        permit start and finish, within the grace period."""
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.running or self.flushes:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.wait(
                list(self.running | self.flushes), timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
