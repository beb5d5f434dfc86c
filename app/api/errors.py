"""Typed errors carrying their HTTP status; one handler turns them into {"error", "detail"}."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status = 500
    error = "internal error"

    def __init__(self, message: str | None = None, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message or self.error)
        self.message = message or self.error
        self.detail = detail
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "detail": self.detail}


class BadRequest(ServiceError):
    status, error = 400, "bad request"


class Unauthorized(ServiceError):
    status, error = 401, "missing or invalid API key"


class PayloadTooLarge(ServiceError):
    status, error = 413, "payload too large"


class UnsupportedMediaType(ServiceError):
    status, error = 415, "unsupported media type"


class InvalidInput(ServiceError):
    status, error = 422, "invalid input"


class NotReady(ServiceError):
    status, error = 503, "model not ready"


class Forbidden(ServiceError):
    status, error = 403, "forbidden"


class Conflict(ServiceError):
    status, error = 409, "conflict"


class ReloadFailed(ServiceError):
    status, error = 422, "reload refused"


class Overloaded(ServiceError):
    status, error = 503, "overloaded"
