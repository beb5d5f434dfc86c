"""The served model and the state every request reads: loading, warm-up, keys, body limits."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import Response

from app.bundle import METHODS, Bundle, load_bundle
from app.calibration import threshold_name
from app.scorer import Scorer, create_scorer
from app.service.batching import Coalescer
from app.service.errors import InvalidInput, NotReady, PayloadTooLarge, Unauthorized
from app.service.metrics import Metrics
from app.service.settings import Settings

log = logging.getLogger("anomaly_scores.service")


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


def load_served(settings: Settings) -> Served:
    bundle = load_bundle(settings.model_path)
    scorer = create_scorer(bundle, settings.backend, settings.device)
    method = resolve_method(settings.method, bundle.default_method)
    fpr = resolve_fpr(bundle, _threshold_setting(settings.threshold), bundle.default_fpr)
    # Warm-up: every method the backend scores itself, so the first request pays no first-call
    # costs. A delegated method (projected on onnx) starts its backend on first use instead: a
    # CPU deployment that never asks for it never imports PyTorch.
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
        self.coalescer = (
            Coalescer(settings.coalesce_max_rows, settings.coalesce_wait_ms / 1000, self.metrics)
            if settings.coalesce
            else None
        )
        self.served: Served | None = None
        self.error: str | None = None

    def load(self) -> None:
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
