"""The FastAPI app factory: routes parse and delegate, errors map to responses in one place.

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
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.errors import Conflict, ServiceError
from app.api.logs import RequestLogMiddleware, configure_logging
from app.api.routes import router
from app.api.runtime import Runtime, json_response
from app.api.settings import Settings

log = logging.getLogger("anomaly_scores.service")


def register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> Response:
        return json_response(exc.body(), exc.status, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return json_response({"error": str(exc.detail), "detail": None}, exc.status_code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        # Only the fields a client needs: an error's 'input' may be raw bytes or an integer orjson
        # cannot write, and echoing it back adds nothing.
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return json_response({"error": "invalid request", "detail": detail}, 422)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return json_response({"error": "internal error", "detail": type(exc).__name__}, 500)


def create_app(settings: Settings | None = None) -> FastAPI:
    runtime = Runtime(settings or Settings())
    configure_logging(runtime.settings.log_level)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Loading runs beside the server so /healthz answers at once and /readyz says 503 until done.
        threading.Thread(target=runtime.load, name="model-load", daemon=True).start()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(
            NotImplementedError, RuntimeError, ValueError
        ):  # no signals off the main thread
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, reload_on_signal))
        yield
        await runtime.drain()

    def reload_on_signal() -> None:
        """SIGHUP: reload the current model path (a new bundle rolled into the same directory)."""
        try:
            runtime.reload()
        except Conflict:
            log.warning("SIGHUP ignored: a reload is already in progress")
        except ServiceError:
            pass  # a refused reload is logged and counted by Runtime.reload

    app = FastAPI(
        title="anomaly-scores",
        version="0.1.0",
        summary="Anomaly scores for tabular data: the exact manifold likelihood (Smidl, Bim, Pevny 2019).",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.add_middleware(RequestLogMiddleware, metrics=runtime.metrics)
    register_error_handlers(app)
    app.include_router(router)
    return app
