"""API keys for scoring and metadata, the admin key for reloads; compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from app.api.errors import Forbidden, Unauthorized
from app.api.settings import Settings


def authorize(request: Request, settings: Settings) -> None:
    """No keys configured: open. Otherwise X-API-Key or 'Authorization: Bearer <key>' must match one."""
    keys = settings.api_keys
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


def authorize_admin(request: Request, settings: Settings) -> None:
    expected = settings.admin_key
    if not expected:
        raise Forbidden("admin routes are disabled: set ANOMALY_ADMIN_KEY to enable them")
    key = request.headers.get("x-admin-key", "")
    if not hmac.compare_digest(key.encode(), expected.encode()):
        raise Unauthorized("missing or invalid admin key: send it as X-Admin-Key")
