"""The served model and the state every request reads: loading, warm-up, keys, body limits."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import Response
from numpy.typing import NDArray
from starlette.concurrency import run_in_threadpool

from app.api.batching import Coalescer
from app.api.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ReloadFailed,
    Unauthorized,
)
from app.api.metrics import Metrics
from app.api.settings import Settings
from app.bundle.calibration import threshold_name
from app.bundle.format import METHODS, Bundle, load_bundle
from app.engine.scorer import ScoreOutput, Scorer, create_scorer

log = logging.getLogger("anomaly_scores.service")
T = TypeVar("T")


@dataclass(frozen=True)
class Served:
    """Everything a request needs about the model, swapped as one object."""

    bundle: Bundle
    scorer: Scorer
    method: str
    fpr: float


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def resolve_fpr(bundle: Bundle, threshold: str | float | None, fallback: float) -> float:
    if threshold is None:
        return fallback
    accepted = {threshold_name(f): f for f in bundle.fprs}
    if isinstance(threshold, str) and threshold in accepted:
        return accepted[threshold]
    if not isinstance(threshold, str):
        for fpr in bundle.fprs:
            if abs(fpr - threshold) <= 1e-12 * max(1.0, fpr):
                return fpr
    raise InvalidInput(
        f"unknown threshold {threshold!r}; accepted: names {list(accepted)} or rates {bundle.fprs}",
        {"accepted": list(accepted)},
    )


def resolve_method(method: str | None, fallback: str) -> str:
    if method is None:
        return fallback
    if method not in METHODS:
        raise InvalidInput(
            f"unknown method {method!r}; accepted: {list(METHODS)}", {"accepted": list(METHODS)}
        )
    return method


def load_served(settings: Settings, path: Path | None = None) -> Served:
    bundle = load_bundle(path or settings.model_path)
    scorer = create_scorer(bundle, settings.backend, settings.device, settings.onnx_threads)
    method = resolve_method(settings.method, bundle.default_method)
    fpr = resolve_fpr(bundle, _threshold_setting(settings.threshold), bundle.default_fpr)
    # Warm-up: every method the backend scores itself, so the first request pays no first-call
    # costs. A delegated method (one an old bundle has no graph for) starts its backend on first
    # use instead: a CPU deployment that never asks for it never imports PyTorch.
    rows = np.repeat(bundle.scaler.mean[None], settings.warmup_rows, axis=0)
    rows += np.random.default_rng(0).standard_normal(rows.shape) * bundle.scaler.scale
    for m in scorer.native_methods:
        scorer.score(rows, m, fpr)
    return Served(bundle, scorer, method, fpr)


def _threshold_setting(value: str | None) -> str | float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value


class Runtime:
    """The service's mutable state: settings, metrics and the served model, reached via app.state."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # torch calls cost a millisecond and more even for one row: always in a thread
        self.inline_rows = settings.inline_rows if settings.backend == "onnx" else 0
        self.coalescer = (
            Coalescer(
                settings.coalesce_max_rows, settings.coalesce_wait_ms / 1000, self.metrics, self.inline_rows
            )
            if settings.coalesce
            else None
        )
        self.served: Served | None = None
        self.error: str | None = None
        self.model_path = settings.model_path
        self.reload_lock = threading.Lock()
        self.admitted = 0  # scoring requests admitted and not yet answered
        self.slots = asyncio.Semaphore(settings.scoring_concurrency)
        self.running: set[asyncio.Future[Any]] = set()
        self.draining = False  # set on SIGTERM: /readyz turns 503 while requests are still served

    def load(self) -> None:
        """The first load, at start-up; under the reload lock, so an early reload cannot race it."""
        with self.reload_lock:
            if self.served is None:
                self._first_load()

    def _first_load(self) -> None:
        try:
            served = load_served(self.settings)
        except Exception as e:  # reported on /readyz and in the log; the process stays up
            self.error = f"{type(e).__name__}: {e}"
            log.error(
                "model load failed",
                extra={"fields": {"model_path": str(self.settings.model_path), "error": str(e)}},
            )
            return
        self.metrics.attach_model(served.bundle, served.method)
        self.served = served
        log.info(
            "model ready", extra={"fields": {"name": served.bundle.name, "version": served.bundle.version}}
        )

    def reload(self, path: Path | None = None) -> Served:
        """Load a bundle beside the served one, warm it up, then swap; on any failure keep the old.

        The swap is one attribute assignment: a request holds the Served it started with, so
        requests in flight finish on their model and every response names the version that scored
        it. Runs in a worker thread (blocking), one reload at a time.
        """
        target = self.model_path if path is None else path
        if not self.reload_lock.acquire(blocking=False):
            raise Conflict("a reload is already in progress")
        try:
            try:
                served = load_served(self.settings, target)
            except Exception as e:
                self.metrics.reloads.labels("failure").inc()
                fields = {"model_path": str(target), "error": f"{type(e).__name__}: {e}"}
                log.error("reload refused; the previous model keeps serving", extra={"fields": fields})
                raise ReloadFailed(f"reload of {target} refused: {type(e).__name__}: {e}", fields) from e
            self.metrics.attach_model(served.bundle, served.method)
            self.served, self.error, self.model_path = served, None, target
            self.metrics.reloads.labels("success").inc()
            fields = {"name": served.bundle.name, "version": served.bundle.version, "model_path": str(target)}
            log.info("model reloaded", extra={"fields": fields})
            return served
        finally:
            self.reload_lock.release()

    def resolve_reload_path(self, requested: str | None) -> Path | None:
        """A bundle path named by an admin must lie inside the configured model root."""
        if requested is None:
            return None
        root = (self.settings.model_root or self.settings.model_path.parent).resolve()
        try:
            path = (root / requested).resolve()
        except (ValueError, OSError) as e:  # a NUL byte, a name too long
            raise InvalidInput(f"path {requested!r} is not a usable path: {e}", {"root": str(root)}) from None
        if not path.is_relative_to(root):
            raise InvalidInput(f"path {requested!r} lies outside the model root {root}", {"root": str(root)})
        return path

    def authorize_admin(self, request: Request) -> None:
        expected = self.settings.admin_key
        if not expected:
            raise Forbidden("admin routes are disabled: set ANOMALY_ADMIN_KEY to enable them")
        key = request.headers.get("x-admin-key", "")
        if not hmac.compare_digest(key.encode(), expected.encode()):
            raise Unauthorized("missing or invalid admin key: send it as X-Admin-Key")

    @contextlib.asynccontextmanager
    async def admission(self) -> AsyncIterator[None]:
        """Bounded scoring queue: beyond max_queue requests admitted, answer 503 at once."""
        if self.admitted >= self.settings.max_queue:
            self.metrics.rejected.inc()
            raise Overloaded(
                f"{self.admitted} scoring requests already queued; the limit is {self.settings.max_queue}",
                {"queued": self.admitted, "limit": self.settings.max_queue},
                headers={"Retry-After": "1"},
            )
        self.admitted += 1
        self.metrics.queue_depth.set(self.admitted)
        try:
            yield
        finally:
            self.admitted -= 1
            self.metrics.queue_depth.set(self.admitted)

    async def score(
        self, scorer: Scorer, x: NDArray[np.float64], method: str, fpr: float, explain: bool
    ) -> ScoreOutput:
        """Coalesced, scored on the event loop when small, or in a worker thread."""
        if self.coalescer is not None:
            return await self.coalescer.score(scorer, x, method, fpr, explain)
        if x.shape[0] <= self.inline_rows:
            # A few rows cost onnxruntime ~0.1 ms: less than handing them to a thread and back, two
            # hand-offs of the GIL that wait up to its switch interval while the loop holds it.
            return scorer.score(x, method, fpr, explain)
        return await self.run_scoring(scorer.score, x, method, fpr, explain)

    async def run_scoring(self, fn: Callable[..., T], *args: Any) -> T:
        """Score off the event loop, at most scoring_concurrency at a time, within the time limit.

        A call that outlives the limit answers 503 but keeps its slot until its thread finishes,
        so timed-out work still counts against the concurrency it really uses.
        """
        limit = self.settings.request_timeout_s
        try:
            async with asyncio.timeout(limit):
                await self.slots.acquire()
                task = asyncio.ensure_future(run_in_threadpool(fn, *args))
                self.running.add(task)
                task.add_done_callback(self._finished)
                return await asyncio.shield(task)
        except TimeoutError:
            self.metrics.timeouts.inc()
            raise Overloaded(
                f"scoring did not finish within {limit} s", {"limit_s": limit}, headers={"Retry-After": "1"}
            ) from None

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self.slots.release()
        self.running.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a timed-out call's error was already answered with 503

    async def drain(self) -> None:
        """On shutdown: let scoring threads still running finish, within the grace period."""
        if self.running:
            await asyncio.wait(list(self.running), timeout=self.settings.shutdown_grace_s)

    def served_or_503(self) -> Served:
        if self.served is None:
            message = "the model is still loading" if self.error is None else "the model failed to load"
            raise NotReady(message, self.error, headers={"Retry-After": "1"})
        return self.served

    def authorize(self, request: Request) -> None:
        keys = self.settings.api_keys
        if not keys:
            return
        key = request.headers.get("x-api-key", "")
        authorization = request.headers.get("authorization", "")
        if not key and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        # compare_digest against every key, so timing reveals neither which key nor how much matched
        matched = False
        for candidate in keys:
            matched |= hmac.compare_digest(key.encode(), candidate.encode())
        if not matched:
            raise Unauthorized(
                "missing or invalid API key: send one as X-API-Key or as 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"body of {declared} bytes; the limit is {limit}", {"limit": limit})
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body larger than the limit of {limit} bytes", {"limit": limit})
            chunks.append(chunk)
        return b"".join(chunks)
