"""Errors of the scoring core, each carrying the HTTP status a transport answers it with.

The core raises them without knowing about HTTP; app.api.errors maps every ServiceError (and the
model's UnknownMethod) to a response in one handler, as MLServer's errors.py / rest/errors.py do.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status = 500
    error = "internal error"

    def __init__(
        self, message: str | None = None, detail: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message or self.error)
        self.message = message or self.error
        self.detail = detail
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "detail": self.detail}


class InvalidInput(ServiceError):
    status, error = 422, "invalid input"


class NotReady(ServiceError):
    status, error = 503, "model not ready"


class Overloaded(ServiceError):
    """The scoring queue is full, or a request ran past its time limit: try again shortly."""

    status, error = 503, "overloaded"


class Conflict(ServiceError):
    status, error = 409, "conflict"


class ReloadFailed(ServiceError):
    status, error = 422, "reload refused"


class LoadTimedOut(ServiceError):
    """A load did not finish within its time limit; it was abandoned and the old model serves on."""

    status, error = 503, "load timed out"


class ScoringFailed(ServiceError):
    """The backend failed or answered out of shape (a broken graph): the server's fault, not the input's."""

    status, error = 500, "scoring failed"
