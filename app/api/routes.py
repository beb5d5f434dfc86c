"""The routes: parse, delegate to the engine, answer. No logic of their own."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import generate_latest

from app.api import schemas
from app.api.auth import authorize, authorize_admin
from app.api.body import media_type, read_body
from app.api.errors import json_response
from app.api.parsing import ScoreRequest, check_query, parse_json, parse_npy, parse_reload
from app.api.scoring import score_body
from app.api.service import Service
from app.bundle.calibration import threshold_name
from app.bundle.format import EnsembleBundle
from app.engine.errors import NotReady
from app.engine.host import Served
from app.engine.scorer import ScoreOutput, mismatch_names
from app.model.methods import METHODS

router = APIRouter()
CONTENT_TYPES = ["application/json", "application/x-npy"]
# An admin request names a path: anything longer is no reload request.
ADMIN_BODY_BYTES = 64 * 1024
# The classic text format, which every Prometheus release (Debian's included) scrapes.
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# The options of a .npy body, documented as query parameters. Documentation only: FastAPI does not
# parse them (app.api.parsing does, and refuses them on a JSON request, whose options are in its body).
# No `default` or `example`: Swagger UI would fill them in and send them with a JSON "Try it out".
NPY_ONLY = (
    "Only with an `application/x-npy` body: a JSON request takes its options in the body and is "
    "refused (422) when it sends query parameters. "
)
NPY_QUERY_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "method",
        "in": "query",
        "required": False,
        "description": NPY_ONLY + "Score method; default: the service's.",
        "schema": {"type": "string", "enum": list(METHODS)},
    },
    {
        "name": "threshold",
        "in": "query",
        "required": False,
        "description": NPY_ONLY + "A false-positive rate (0.05) or a threshold's name (fpr_0.05); "
        "default: the service's.",
        "schema": {"type": "string"},
    },
    {
        "name": "components",
        "in": "query",
        "required": False,
        "description": NPY_ONLY + "Add log_prior, log_volume, log_residual, reconstruction_error "
        "(default false).",
        "schema": {"type": "boolean"},
    },
    {
        "name": "explain",
        "in": "query",
        "required": False,
        "description": NPY_ONLY + "Add each feature's share of the squared residual (default false).",
        "schema": {"type": "boolean"},
    },
]


def service_of(request: Request) -> Service:
    return request.app.state.service


def _response_body(served: Served, out: ScoreOutput, request: ScoreRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"name": served.bundle.name, "version": served.bundle.version},
        "method": out.method,
        "threshold": {"name": out.threshold.name, "fpr": out.threshold.fpr, "value": out.threshold.value},
        "scores": out.score,
        "is_anomaly": out.is_anomaly,
        "p_values": out.p_value,
        "log_likelihood": out.log_likelihood,
    }
    if request.components:
        body |= {
            "log_prior": out.log_prior,
            "log_volume": out.log_volume,
            "log_residual": out.log_residual,
            "reconstruction_error": out.reconstruction_error,
        }
        if out.member_scores is not None:  # an ensemble's: per row, each member's score
            body["member_scores"] = out.member_scores
    constants = served.bundle.constants
    if constants:
        body["constant_mismatch"] = mismatch_names(out.constant_mismatch, list(constants))
    if request.ids is not None:
        body["ids"] = request.ids
    if request.explain:
        body["explain"] = {"features": served.bundle.features, "residual_share": out.residual_share}
    return body


@router.post(
    "/score",
    tags=["scoring"],
    summary="Score rows",
    description="Anomaly scores, conformal p-values and flags for a batch of rows: a JSON document "
    "(rows as lists in the model's column order, GET /model's `columns`, or objects keyed by column "
    "name; options in the "
    "body) or a NumPy `.npy` float32/float64 matrix (options as query parameters). Errors name the "
    "row and column at fault. The examples are built from the served model's features.",
    response_model=None,
    responses={
        200: {
            "model": schemas.ScoreResponse,
            "content": {"application/json": {"example": schemas.RESPONSE_EXAMPLE}},
        },
        **{code: {"model": schemas.ErrorResponse} for code in (400, 401, 408, 413, 415, 422, 503)},
    },
    openapi_extra={
        "parameters": NPY_QUERY_PARAMETERS,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": schemas.ScoreRequest.model_json_schema(),
                    "examples": schemas.REQUEST_EXAMPLES,
                },
                "application/x-npy": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "a NumPy .npy file of a float32 or float64 (rows, features) matrix; "
                    "options as query parameters method, threshold, components, explain",
                },
            },
        },
    },
)
async def score(request: Request) -> Response:
    service = service_of(request)
    authorize(request, service.settings)
    served = service.host.served
    content_type = media_type(request, CONTENT_TYPES)
    query = check_query(content_type, request.query_params.multi_items())
    columns, max_rows = served.bundle.columns, service.settings.max_rows
    if content_type == "application/json":
        parsed, out = await score_body(
            request, service, served, content_type, lambda body: parse_json(body, columns, max_rows)
        )
    else:
        parsed, out = await score_body(
            request, service, served, content_type, lambda body: parse_npy(body, columns, max_rows, query)
        )
    return json_response(_response_body(served, out, parsed))


@router.post(
    "/admin/reload",
    tags=["admin"],
    summary="Load a new bundle beside the served one, warm it up, swap atomically",
    description="Needs the admin key (X-Admin-Key; the route is disabled, 403, without ANOMALY_ADMIN_KEY). "
    "Without a body, reloads the current path (a new bundle rolled into the same directory); with "
    '`{"path": ...}`, loads a bundle directory inside the model root. The old model serves until the '
    "new one is loaded and warmed up; on any failure it keeps serving. One reload at a time (409).",
    responses={
        code: {"model": schemas.ErrorResponse} for code in (400, 401, 403, 408, 409, 413, 415, 422, 503)
    },
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": schemas.ReloadRequest.model_json_schema()}},
        }
    },
)
async def reload(request: Request) -> Response:
    service = service_of(request)
    # The key before the body: an unauthenticated client gets nothing read or parsed.
    authorize_admin(request, service.settings)
    check_query("application/json", request.query_params.multi_items())  # the path goes in the body
    limits = replace(service.body_limits, max_bytes=ADMIN_BODY_BYTES)
    async with read_body(request, limits, service.bodies) as body:
        if body.strip():
            media_type(request, ["application/json"])
        requested = parse_reload(body).path if body.strip() else None
    path = service.host.resolve_reload_path(requested)
    previous = service.host.current.bundle.version if service.host.current is not None else None
    served = await asyncio.wrap_future(service.host.reload_in_background(path))
    return json_response(
        {
            "status": "reloaded",
            "model": {"name": served.bundle.name, "version": served.bundle.version},
            "previous_version": previous,
            "path": str(service.host.model_path),
        }
    )


@router.get(
    "/model",
    tags=["model"],
    summary="Model metadata",
    description="The served bundle: name, version, the columns a row holds (in order), the features "
    "the networks take and the constant columns kept out of them, score methods, default method and "
    "threshold, stored thresholds, calibration summary, architecture, noise and training summary.",
    responses={c: {"model": schemas.ErrorResponse} for c in (401, 503)},
)
async def model(request: Request) -> Response:
    service = service_of(request)
    authorize(request, service.settings)
    served = service.host.served
    bundle = served.bundle
    return json_response(
        {
            "name": bundle.name,
            "version": bundle.version,
            "created": bundle.created,
            "columns": bundle.columns,
            "features": bundle.features,
            "constants": bundle.constants,
            "methods": list(METHODS),
            "default_method": served.method,
            "default_threshold": threshold_name(served.fpr),
            "thresholds": bundle.stored_thresholds,
            "calibration": bundle.calibration_summary,
            # An ensemble's networks are its members' (docs/bundle.md 11).
            "architecture": None if isinstance(bundle, EnsembleBundle) else bundle.architecture.to_dict(),
            "noise": None if isinstance(bundle, EnsembleBundle) else bundle.noise,
            "ensemble": {
                "combination": bundle.manifest["ensemble"]["combination"],
                "members": bundle.member_summaries,
            }
            if isinstance(bundle, EnsembleBundle)
            else None,
            "training": {k: v for k, v in bundle.training.items() if k not in ("loss_curve", "loss_curves")},
        }
    )


@router.get(
    "/healthz",
    tags=["operations"],
    summary="Process alive",
    description="Liveness: 200 as soon as the process answers, before the model is loaded.",
)
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get(
    "/readyz",
    tags=["operations"],
    summary="Model loaded and warmed up",
    description="Readiness: 200 once the model is loaded and warmed up; 503 while it loads, when it "
    "failed to load, and while the process drains on SIGTERM.",
    responses={503: {"model": schemas.ErrorResponse}},
)
async def readyz(request: Request) -> Response:
    service = service_of(request)
    if service.draining:
        raise NotReady("shutting down: requests are still served while the load balancer drains")
    served = service.host.served
    return json_response(
        {"status": "ready", "model": {"name": served.bundle.name, "version": served.bundle.version}}
    )


@router.get(
    "/metrics",
    tags=["operations"],
    summary="Prometheus metrics",
    description="Requests, latencies, queue, scores and model state in Prometheus' text format "
    "(docs/metrics.md).",
    response_class=PlainTextResponse,
)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(service_of(request).metrics.registry), media_type=PROMETHEUS_TEXT)
