"""The FastAPI app factory: settings in, the engine's host and scheduler wired to thin routes.

uvicorn app.api.main:create_app --factory      (settings from ANOMALY_* variables)
anomaly-scores serve [--model DIR] [--host] [--port]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app.api import v2
from app.api.docs import TAGS, install_openapi, mount_docs
from app.api.errors import register_error_handlers
from app.api.head import HeadAsGet
from app.api.logs import RequestLogMiddleware, configure_logging
from app.api.protocol import REFUSED
from app.api.routes import router
from app.api.service import build_service
from app.api.settings import Settings
from app.engine.errors import Conflict
from app.engine.host import Served

log = logging.getLogger("anomaly_scores.service")


def create_app(settings: Settings | None = None) -> FastAPI:
    service = build_service(settings or Settings())
    configure_logging(service.settings.log_level)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # Loading runs beside the server so /healthz answers at once and /readyz says 503 until done.
        threading.Thread(target=service.host.load, name="model-load", daemon=True).start()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(
            NotImplementedError, RuntimeError, ValueError
        ):  # no signals off the main thread
            loop.add_signal_handler(signal.SIGHUP, reload_on_signal)
        # The server shares this state with its connections: the HTTP layer reports its refusals here.
        yield {REFUSED: service.metrics.http_refused}
        await service.scheduler.drain(service.settings.shutdown_grace_s)

    def reload_on_signal() -> None:
        """SIGHUP: reload the current model path (a new bundle rolled into the same directory)."""
        service.host.reload_in_background().add_done_callback(reload_done)

    def reload_done(outcome: Future[Served]) -> None:
        error = outcome.exception()
        if isinstance(error, Conflict):
            log.warning("SIGHUP ignored: a reload is already in progress")
        # any other failure (refused, abandoned) is logged and counted by ModelHost

    app = FastAPI(
        title="anomaly-scores",
        version="0.1.0",
        summary="Anomaly scores for tabular data: the exact manifold likelihood (Smidl, Bim, Pevny 2019).",
        lifespan=lifespan,
        openapi_tags=TAGS,
        # FastAPI's own pages load their assets from a CDN: mount_docs serves them from the package.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(HeadAsGet)  # inside the log's middleware, which records the HEAD
    app.add_middleware(RequestLogMiddleware, metrics=service.metrics)
    register_error_handlers(app)
    app.include_router(router)
    app.include_router(v2.router)
    mount_docs(app)
    install_openapi(app, service)
    return app
