"""Errors of the HTTP transport, and the one place every error becomes a response.

Domain errors come from app.engine.errors (and the model's UnknownMethod); these add what only a
transport can get wrong: keys, media types, body sizes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.errors import ServiceError
from app.model.methods import UnknownMethod

log = logging.getLogger("anomaly_scores.service")


class BadRequest(ServiceError):
    status, error = 400, "bad request"


class Unauthorized(ServiceError):
    status, error = 401, "missing or invalid API key"


class Forbidden(ServiceError):
    status, error = 403, "forbidden"


class RequestTimeout(ServiceError):
    """The body did not arrive in time: too slow on average, or not complete within the deadline."""

    status, error = 408, "request timeout"


class NotFound(ServiceError):
    status, error = 404, "not found"


class PayloadTooLarge(ServiceError):
    status, error = 413, "payload too large"


class UnsupportedMediaType(ServiceError):
    status, error = 415, "unsupported media type"


class ClientClosed(ServiceError):
    """The client went away before its request was read: not the server's failure. 499 is nginx's
    code for it, so the 5xx alert does not fire on client behaviour and dashboards can count it."""

    status, error = 499, "client closed the request"


class RefusedMidBody(ServiceError):
    """The HTTP layer (app.api.protocol) answered the request itself while its body was arriving and
    told the app the connection was gone: raised to stop the app's work on it. Its answer is already
    sent; the request log counts that answer's status."""

    error = "refused mid-body by the HTTP layer"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# The ASGI scope key of the request's id (X-Request-ID: the client's, or one app.api.logs made).
REQUEST_ID = "anomaly_scores.request_id"


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(
    request: Request, content: dict[str, Any], status: int, headers: dict[str, str] | None = None
) -> Response:
    """An error answer that cannot fail: a message may quote client input that orjson refuses to
    write (a lone surrogate from a \\ud800 escape), which JSON's \\u escapes can still carry.
    Under /v2, the Open Inference Protocol's error document: {"error": "..."} alone."""
    if request.url.path == "/v2" or request.url.path.startswith("/v2/"):
        content = {"error": content["error"]}
    try:
        return json_response(content, status, headers)
    except TypeError:
        body = json.dumps(content, ensure_ascii=True, default=str).encode()
        return Response(body, status_code=status, media_type="application/json", headers=headers)


def register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        if isinstance(exc, ClientClosed):
            log.info("client closed the request before it was read")
        return error_response(request, exc.body(), exc.status, exc.headers)

    @app.exception_handler(UnknownMethod)
    async def unknown_method(request: Request, exc: UnknownMethod) -> Response:
        return error_response(request, {"error": str(exc), "detail": {"accepted": exc.accepted}}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        content = {"error": str(exc.detail), "detail": None}
        return error_response(request, content, exc.status_code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        # Only the fields a client needs: an error's 'input' may be raw bytes or an integer orjson
        # cannot write, and echoing it back adds nothing.
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return error_response(request, {"error": "invalid request", "detail": detail}, 422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        request_id = request.scope.get(REQUEST_ID)
        headers = {"X-Request-ID": request_id} if request_id else None
        content = {"error": "internal error", "detail": type(exc).__name__}
        return error_response(request, content, 500, headers)
