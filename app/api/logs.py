"""One JSON log line per request, the X-Request-ID header, and the request metrics.

A pure ASGI middleware: it wraps `send` to learn the status and add the header, so it costs a few
microseconds per request, unlike BaseHTTPMiddleware's extra task and body copy.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import REQUEST_ID, ClientClosed
from app.api.metrics import Metrics
from app.api.protocol import MALFORMED

access = logging.getLogger("anomaly_scores.access")
# Probes and scrapes are not scoring traffic: neither counted nor timed.
UNCOUNTED = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
KNOWN = frozenset(
    {"/score", "/model", "/admin/reload", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}
)


def endpoint_of(path: str) -> str:
    """The metrics label of a path: the route, with the Open Inference Protocol's model names and
    versions left out (one label for every /infer), or "other"."""
    if path in KNOWN:
        return path
    if path.startswith("/v2/models/"):
        return "/v2/infer" if path.endswith("/infer") else "/v2/models"
    return "/v2" if path == "/v2" else "other"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= getattr(record, "fields", {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the service's loggers; idempotent, leaves other loggers alone."""
    root = logging.getLogger("anomaly_scores")
    root.setLevel(level.upper())
    if not any(getattr(h, "anomaly_scores", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler.anomaly_scores = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
                break
        # Echoed in a header and written to logs that people read in terminals: at most 128 visible
        # ASCII characters, or else an id of our own (a cut one would match nothing the client has).
        visible = request_id.isascii() and request_id.isprintable() and request_id.strip()
        if not (visible and len(request_id) <= 128):
            request_id = uuid.uuid4().hex
        # For the answer to an unhandled error, which Starlette's outermost middleware sends around
        # this one: errors.py's handler adds the header from here.
        scope[REQUEST_ID] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            try:
                await send(message)
            except RuntimeError as e:
                # uvloop refuses a write to a transport the client has just closed (asyncio's loop
                # drops it): the client went away, as a 499, not the server's failure to log as one.
                if "closed" not in str(e):
                    raise
                status = ClientClosed.status

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            if MALFORMED in scope:  # the HTTP layer answered it mid-body, whatever the app then tried
                status = scope[MALFORMED][0]
            path = scope["path"]
            if path not in UNCOUNTED:
                endpoint = endpoint_of(path)
                self.metrics.requests.labels(endpoint, str(status)).inc()
                self.metrics.duration.labels(endpoint).observe(elapsed)
            rows = scope.get("state", {}).get("rows")
            access.info(
                "request",
                extra={
                    "fields": {
                        "method": scope["method"],
                        "path": path,
                        "status": status,
                        "rows": rows,
                        "duration_ms": round(elapsed * 1000, 3),
                        "request_id": request_id,
                    }
                },
            )
