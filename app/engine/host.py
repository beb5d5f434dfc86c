"""The served model's lifecycle, without a transport: load, warm up, reload beside the old, swap.

A request takes the current `Served` once and keeps it, so a reload never changes the model under
a request in flight and every answer names the version that scored it.
"""

from __future__ import annotations

import gc
import logging
import re
import reprlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app.bundle.calibration import threshold_name
from app.bundle.format import Bundle, load_bundle
from app.engine.errors import Conflict, InvalidInput, LoadTimedOut, NotReady, ReloadFailed
from app.engine.events import Events, NoEvents
from app.engine.factory import create_scorer
from app.engine.scorer import Scorer
from app.model.methods import check_method

log = logging.getLogger("anomaly_scores.service")


@dataclass(frozen=True)
class HostOptions:
    model_path: Path
    model_root: Path | None = None  # bundles a reload may name lie here (default: model_path's parent)
    backend: str = "onnx"
    device: str = "auto"
    onnx_threads: int = 1
    method: str | None = None  # default method (default: the bundle's)
    threshold: str | None = None  # default threshold: a name such as fpr_0.01 or a rate
    warmup_rows: int = 256
    load_timeout_s: float = 120.0  # a load or reload taking longer is abandoned
    trusted_keys: tuple[Path, ...] = ()  # when set, only bundles signed by one of these are loaded


T = TypeVar("T")
# A rate as a plain decimal number, in ASCII digits.
_DECIMAL = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")

# Abandoned loads still running (each holding what it had read): beyond this, reloads are refused
# until one ends, so a storage outage cannot pile up stuck threads.
MAX_ABANDONED = 2


def load_trusted(path: Path, trusted_keys: tuple[Path, ...]) -> Bundle:
    """The bundle at `path`; with trusted keys, only if one of them signed it (docs/operations.md)."""
    if not trusted_keys:
        return load_bundle(path)
    from app.bundle.signing import load_verified_bundle

    bundle, info = load_verified_bundle(path, trusted_keys)
    log.info("bundle signature verified", extra={"fields": {"model_path": str(path), "key_id": info.key_id}})
    return bundle


def in_daemon_thread(name: str, fn: Callable[..., T], *args: Any) -> Future[T]:
    """fn(*args) in a thread of its own, its outcome in the future. A daemon thread, not an
    executor's, whose threads the interpreter joins at exit: a load stuck on a hung file system
    is abandoned at its time limit and never keeps a SIGTERM from ending the process."""
    future: Future[T] = Future()
    future.set_running_or_notify_cancel()  # running: a waiter that gives up cannot cancel it under fn

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


@dataclass(frozen=True)
class Served:
    """Everything a request needs about the model, swapped as one object."""

    bundle: Bundle
    scorer: Scorer
    method: str  # the default method
    fpr: float  # the default false-positive rate

    def resolve_method(self, method: str | None) -> str:
        if method is None:
            return self.method
        if check_method(method) not in self.scorer.methods:
            accepted = list(self.scorer.methods)
            raise InvalidInput(
                f"method {method!r} cannot be scored here: the {self.scorer.backend} backend has no "
                f"graph for it in this bundle; accepted: {accepted}",
                {"accepted": accepted},
            )
        return method

    def resolve_fpr(self, threshold: str | float | None, method: str) -> float:
        return resolve_fpr(self.bundle, threshold, self.fpr, method)


def resolve_fpr(bundle: Bundle, threshold: str | float | None, fallback: float, method: str) -> float:
    """A threshold named (fpr_0.05) or given as a rate -> that rate. Any rate in (0, 1) that the
    method's n calibration scores can resolve (at least 1/n) is accepted, as at training time: the
    threshold is derived from the stored scores on the spot (app.bundle.calibration)."""
    if threshold is None:
        return fallback
    names = {threshold_name(f): f for f in bundle.fprs}
    rate: float | None = None
    if isinstance(threshold, str):
        if threshold in names:
            return names[threshold]
        text = threshold.removeprefix("fpr_")
        if _DECIMAL.fullmatch(text):  # not float()'s wider syntax: "0.1_0", Arabic-Indic digits, "nan"
            rate = float(text)
    else:
        rate = float(threshold)
    n = bundle.calibration[method].size
    if rate is None or not 1 / n <= rate < 1:
        raise InvalidInput(
            f"threshold {reprlib.repr(threshold)}: give a false-positive rate from 1/n = {1 / n:.3g} ({n} "
            f"calibration scores of {method!r}) and below 1, as a number or a name such as fpr_0.05; "
            f"calibrated at training: {list(names)}",
            {"accepted": list(names), "min_rate": 1 / n},
        )
    for fpr in bundle.fprs:  # a calibrated rate keeps its name, whatever its float spelling
        if abs(fpr - rate) <= 1e-12 * max(1.0, fpr):
            return fpr
    return rate


class ModelHost:
    def __init__(self, options: HostOptions, events: Events | None = None) -> None:
        self.options = options
        self.events = events or NoEvents()
        self.current: Served | None = None
        self.error: str | None = None
        self.model_path = options.model_path
        self.reload_lock = threading.Lock()
        self.abandoned: set[Future[Served]] = set()  # loads past their time limit, still running

    def prepare(self, path: Path) -> Served:
        """Load, check the defaults, and warm up every method the backend scores, so the first
        request pays no first-call costs."""
        o = self.options
        bundle = load_trusted(path, o.trusted_keys)
        scorer = create_scorer(bundle, o.backend, o.device, o.onnx_threads)
        method = bundle.default_method if o.method is None else check_method(o.method)
        if method not in scorer.methods:
            raise ValueError(
                f"the default method {method!r} cannot be scored by the {o.backend} backend here"
            )
        fpr = resolve_fpr(bundle, o.threshold, bundle.default_fpr, method)
        rows = bundle.sample_rows(o.warmup_rows)
        for m in scorer.methods:
            scorer.score(rows, m, fpr)
        return Served(bundle, scorer, method, fpr)

    def _start_prepare(self, path: Path) -> Future[Served]:
        return in_daemon_thread("model-load", self.prepare, path)

    def _abandon(self, future: Future[Served], path: Path) -> LoadTimedOut:
        limit = self.options.load_timeout_s
        self.abandoned.add(future)
        future.add_done_callback(self.abandoned.discard)
        fields = {"model_path": str(path), "load_timeout_s": limit}
        log.error("load abandoned: it did not finish in time", extra={"fields": fields})
        return LoadTimedOut(
            f"loading {path} did not finish within {limit:g} s; it was abandoned and the previous "
            "model keeps serving",
            fields,
        )

    def load(self) -> None:
        """The first load, at start-up; under the reload lock, so an early reload cannot race it.
        A failure is kept in `error` (readiness reports it); the process stays up."""
        with self.reload_lock:
            if self.current is not None:
                return
            future = self._start_prepare(self.model_path)
            try:
                served = future.result(self.options.load_timeout_s)
            except TimeoutError:
                self.error = str(self._abandon(future, self.model_path))
                return
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                fields = {"model_path": str(self.model_path), "error": str(e)}
                log.error("model load failed", extra={"fields": fields})
                return
            self._swap(served, self.model_path)
            fields = {"name": served.bundle.name, "version": served.bundle.version}
            log.info("model ready", extra={"fields": fields})

    def reload(self, path: Path | None = None) -> Served:
        """Load a bundle beside the served one, warm it up, then swap; on any failure, or past the
        time limit, keep the old. Blocking; one reload at a time."""
        target, future = self._begin_reload(path)
        try:
            try:
                served = future.result(self.options.load_timeout_s)
            except TimeoutError:
                self.events.reload_finished(False)
                raise self._abandon(future, target) from None
            except Exception as e:
                raise self._refused(target, e) from e
            return self._finish_reload(served, target)
        finally:
            self.reload_lock.release()

    def reload_in_background(self, path: Path | None = None) -> Future[Served]:
        """reload without blocking the caller (the event loop awaits the future wrapped; SIGHUP
        only logs its outcome)."""
        return in_daemon_thread("model-reload", self.reload, path)

    def _begin_reload(self, path: Path | None) -> tuple[Path, Future[Served]]:
        target = self.model_path if path is None else path
        if not self.reload_lock.acquire(blocking=False):
            raise Conflict("a reload is already in progress")
        if len(self.abandoned) >= MAX_ABANDONED:
            self.reload_lock.release()
            # A reload asked for and not done, as a refused bundle is: logged and counted, so a
            # SIGHUP's (whose caller only logs conflicts) is not lost without a trace.
            self.events.reload_finished(False)
            fields = {"model_path": str(target), "abandoned": len(self.abandoned)}
            log.error("reload refused: abandoned loads are still running", extra={"fields": fields})
            raise LoadTimedOut(
                f"{len(self.abandoned)} abandoned loads are still running; a new one starts when one "
                "of them ends (restart the process to end them now)",
                {"abandoned": len(self.abandoned)},
            )
        return target, self._start_prepare(target)

    def _refused(self, target: Path, e: Exception) -> ReloadFailed:
        self.events.reload_finished(False)
        fields = {"model_path": str(target), "error": f"{type(e).__name__}: {e}"}
        log.error("reload refused; the previous model keeps serving", extra={"fields": fields})
        return ReloadFailed(f"reload of {target} refused: {type(e).__name__}: {e}", fields)

    def _finish_reload(self, served: Served, target: Path) -> Served:
        self._swap(served, target)
        self.events.reload_finished(True)
        fields = {"name": served.bundle.name, "version": served.bundle.version, "model_path": str(target)}
        log.info("model reloaded", extra={"fields": fields})
        return served

    def _swap(self, served: Served, path: Path) -> None:
        first = self.current is None
        # One assignment: a request holds the Served it started with.
        self.current, self.error, self.model_path = served, None, path
        self.events.model_ready(served.bundle, served.method)
        _settle_heap(first)

    @property
    def served(self) -> Served:
        if self.current is None:
            message = "the model is still loading" if self.error is None else "the model failed to load"
            raise NotReady(message, self.error, headers={"Retry-After": "1"})
        return self.current

    def resolve_reload_path(self, requested: str | None) -> Path | None:
        """A bundle path named by an admin must lie inside the configured model root."""
        if requested is None:
            return None
        root = (self.options.model_root or self.options.model_path.parent).resolve()
        try:
            path = (root / requested).resolve()
        except (ValueError, OSError) as e:  # a NUL byte, a name too long
            raise InvalidInput(f"path {requested!r} is not a usable path: {e}", {"root": str(root)}) from None
        if not path.is_relative_to(root):
            raise InvalidInput(f"path {requested!r} lies outside the model root {root}", {"root": str(root)})
        # Its files too: a bundle of symbolic links would load whatever they point at.
        try:
            entries = list(path.iterdir()) if path.is_dir() else []
            outside = next((e for e in entries if not e.resolve().is_relative_to(root)), None)
        except OSError as e:  # a name too long for the file system, a directory not readable
            raise InvalidInput(f"path {requested!r} is not a usable path: {e}", {"root": str(root)}) from None
        if outside is not None:
            message = f"{requested}/{outside.name} links outside the model root {root}"
            raise InvalidInput(message, {"root": str(root)})
        return path


def _settle_heap(first: bool) -> None:
    """Move what a loaded service holds out of the garbage collector's sight. A full collection
    walks every tracked object, about 85 000 once an app and a bundle are loaded, for about 60 ms
    on the GIL; it fell on random requests and made their tail: single-row p99 of 68-76 ms under
    coalescing, 10.5-12 ms with the heap frozen (benchmarks/http_load.py, 16 connections). After
    a reload the old model's cycles are collected first, so that reloads leak nothing."""
    if not first:
        gc.unfreeze()
        gc.collect()
    gc.freeze()
