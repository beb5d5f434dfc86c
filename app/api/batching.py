"""Request coalescing: concurrent requests merged into one scoring batch, each answered its own rows.

Requests that ask for the same scorer, method, threshold and explain flag wait in one group until
it holds `max_rows` rows or its first request has waited `wait_s`; the group is then scored in
one call off the event loop and every request gets back exactly the slice of rows it sent.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from starlette.concurrency import run_in_threadpool

from app.api.metrics import Metrics
from app.engine.scorer import ScoreOutput, Scorer

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
    timer: asyncio.TimerHandle | None = None


class Coalescer:
    def __init__(self, max_rows: int, wait_s: float, metrics: Metrics, inline_rows: int = 0) -> None:
        self.max_rows, self.wait_s, self.metrics = max_rows, wait_s, metrics
        self.inline_rows = inline_rows  # merged batches this small are scored on the event loop
        self.groups: dict[Key, _Group] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def score(
        self, scorer: Scorer, x: NDArray[np.float64], method: str, fpr: float | None, explain: bool
    ) -> ScoreOutput:
        loop = asyncio.get_running_loop()
        key = (id(scorer), method, fpr, explain)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(scorer, method, fpr, explain)
            group.timer = loop.call_later(self.wait_s, self._flush, key)
        waiting = _Waiting(x, loop.create_future(), time.perf_counter())
        group.items.append(waiting)
        group.rows += x.shape[0]
        if group.rows >= self.max_rows:
            self._flush(key)
        return await waiting.future

    def _flush(self, key: Key) -> None:
        group = self.groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._run(group))
        self.tasks.add(task)  # held until done, so the task is not garbage-collected mid-flight
        task.add_done_callback(self.tasks.discard)

    async def _run(self, group: _Group) -> None:
        now = time.perf_counter()
        for item in group.items:
            self.metrics.queue_seconds.observe(now - item.since)
        self.metrics.merged_rows.observe(group.rows)
        x = np.concatenate([item.x for item in group.items]) if len(group.items) > 1 else group.items[0].x
        try:
            args = (x, group.method, group.fpr, group.explain)
            if group.rows <= self.inline_rows:
                out = group.scorer.score(*args)
            else:
                out = await run_in_threadpool(group.scorer.score, *args)
        except Exception as e:  # every waiting request gets the error its own call would have raised
            for item in group.items:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        start = 0
        for item in group.items:
            stop = start + item.x.shape[0]
            if not item.future.done():  # a client that went away cancelled its future
                item.future.set_result(out.rows(start, stop))
            start = stop
