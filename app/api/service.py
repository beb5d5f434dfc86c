"""The service's parts, built once from the settings: what the routes reach through app.state."""

from __future__ import annotations

from dataclasses import dataclass

from app.api.body import BodyBudget, BodyLimits
from app.api.metrics import Metrics
from app.api.settings import Settings
from app.engine.host import HostOptions, ModelHost
from app.engine.scheduler import Scheduler, SchedulerOptions


@dataclass
class Service:
    """What the routes reach through app.state.service."""

    settings: Settings
    metrics: Metrics
    host: ModelHost
    scheduler: Scheduler
    body_limits: BodyLimits
    bodies: BodyBudget  # bytes of request bodies held at once, across requests
    draining: bool = False  # set on SIGTERM: /readyz turns 503 while requests are still served


# A CPU call's cost grows with its rows from a few hundred on. A GPU call's is fixed launch and copy
# overhead until tens of thousands of rows: the arithmetic of 65 536 rows through a 3 x 64 network
# with its k = 4 Jacobian, about 8 GFLOP, is some 0.1 ms of an H200's FP32 peak (issue 20), so
# merged batches there may grow that far.
CPU_COALESCE_ROWS, GPU_COALESCE_ROWS = 4096, 65536


def coalesce_rows(settings: Settings) -> int:
    """ANOMALY_COALESCE_MAX_ROWS, or the default for the device the model will be scored on."""
    if settings.coalesce_max_rows is not None:
        return settings.coalesce_max_rows
    if settings.backend == "torch" and settings.device != "cpu":
        import torch  # the torch backend's own dependency; the onnx service never loads it

        if torch.cuda.is_available():
            return GPU_COALESCE_ROWS
    return CPU_COALESCE_ROWS


def build_service(settings: Settings) -> Service:
    metrics = Metrics()
    host = ModelHost(
        HostOptions(
            model_path=settings.model_path,
            model_root=settings.model_root,
            backend=settings.backend,
            device=settings.device,
            onnx_threads=settings.onnx_threads,
            method=settings.method,
            threshold=settings.threshold,
            warmup_rows=settings.warmup_rows,
            load_timeout_s=settings.load_timeout_s,
            trusted_keys=tuple(settings.trusted_keys),
        ),
        metrics,
    )
    scheduler = Scheduler(
        SchedulerOptions(
            max_queue=settings.max_queue,
            concurrency=settings.scoring_concurrency,
            timeout_s=settings.request_timeout_s,
            # torch calls cost a millisecond and more even for one row: always in a thread
            inline_rows=settings.inline_rows if settings.backend == "onnx" else 0,
            coalesce_max_rows=coalesce_rows(settings) if settings.coalesce else None,
            coalesce_wait_s=settings.coalesce_wait_ms / 1000,
        ),
        metrics,
    )
    limits = BodyLimits(
        settings.max_body_bytes, settings.body_timeout_s, settings.body_min_rate, settings.body_rate_window_s
    )
    bodies = BodyBudget(settings.max_inflight_body_bytes, metrics.body_bytes.set, metrics.body_rejections.inc)
    return Service(settings, metrics, host, scheduler, limits, bodies)
