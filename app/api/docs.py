"""The API's documentation: Swagger UI at /docs and ReDoc at /redoc, from assets the service serves
itself, and an OpenAPI document whose examples fit the served model.

Offline: FastAPI's own pages load Swagger UI and ReDoc from a CDN (and ReDoc its fonts from Google
Fonts), so on a network without internet access they render blank. The `fastapi-offline` package
ships the same bundles (Swagger UI 5, ReDoc 2, MIT) inside its wheel: they are mounted under ASSETS
and the pages name nothing outside the service.

Examples: FastAPI builds the document once and caches it, but the model loads in the background
after start-up. The document is therefore rebuilt whenever the served bundle differs from the one
it was built for (first load, reload), so /score's examples carry every feature of that bundle, at
its training centres (the scaler's), and Swagger's "Try it out" answers 200. Until a model is
served, the static examples of app.api.schemas stand in (and are not kept once one is). The error
examples are the service's own documents, most of them produced by the code that raises them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.api import schemas
from app.api.auth import authorize, authorize_admin
from app.api.body import BodyBudget
from app.api.errors import PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from app.api.parsing import check_query, parse_json, parse_reload
from app.api.routes import ADMIN_BODY_BYTES, CONTENT_TYPES
from app.api.service import Service
from app.api.settings import Settings
from app.engine.errors import Conflict, LoadTimedOut, NotReady, Overloaded, ServiceError
from app.engine.host import Served
from app.model.methods import UnknownMethod, check_method

# The assets' own prefix. Not in app.api.logs' KNOWN: they all count under one "other" endpoint label.
ASSETS = "/docs-assets"
ASSETS_PACKAGE = ("fastapi_offline", "static")
OAUTH2_REDIRECT = "/docs/oauth2-redirect"

TAGS: list[dict[str, str]] = [
    {"name": "scoring", "description": "Anomaly scores for rows of the served model's features."},
    {"name": "model", "description": "What the served model is and takes."},
    {"name": "operations", "description": "Liveness, readiness and Prometheus metrics: no key needed."},
    {"name": "admin", "description": "Model roll-out; needs the admin key (X-Admin-Key)."},
    {
        "name": "Open Inference Protocol (V2)",
        "description": "The KServe V2 REST API (Triton, MLServer and KServe clients): the same scores "
        "as /score, JSON or binary tensors.",
    },
]

# The features of the static examples (app.api.schemas), shown while no model is served.
FALLBACK_FEATURES = list(schemas.REQUEST_EXAMPLES["named"]["value"]["instances"][0])
RETRY_AFTER = {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}
Examples = dict[int, dict[str, dict[str, Any]]]  # status -> example name -> {summary, value}


def mount_docs(app: FastAPI) -> None:
    """/docs, its OAuth2 redirect page and /redoc on the locally served assets. The app must be
    created with docs_url=None and redoc_url=None, so FastAPI's CDN pages are not registered."""
    app.mount(ASSETS, StaticFiles(packages=[ASSETS_PACKAGE]), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    def root_of(request: Request) -> str:
        # Behind a proxy that strips a prefix, the page must ask for the prefixed URLs.
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = root_of(request)
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            oauth2_redirect_url=root + OAUTH2_REDIRECT,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    # Kept as FastAPI registers it beside /docs: Swagger UI's page for OAuth2 flows (none declared today).
    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = root_of(request)
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
            with_google_fonts=False,
        )


def install_openapi(app: FastAPI, service: Service) -> None:
    """Replace app.openapi: the document is cached per served bundle, never for good before one."""
    described: list[tuple[str, str] | None] = [None]  # the bundle the cached document was built for

    def openapi() -> dict[str, Any]:
        served = service.host.current  # read once: a reload may swap it meanwhile
        key = None if served is None else (served.bundle.name, served.bundle.version)
        if app.openapi_schema is None or described[0] != key:
            app.openapi_schema = None  # FastAPI.openapi returns its cached document otherwise
            # A copy: FastAPI puts openapi_extra's objects (app.api.schemas' examples) in by reference.
            document = copy.deepcopy(FastAPI.openapi(app))
            add_examples(document, served, service.settings)
            app.openapi_schema, described[0] = document, key
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_examples(document: dict[str, Any], served: Served | None, settings: Settings) -> None:
    paths = document["paths"]
    features = FALLBACK_FEATURES if served is None else served.bundle.columns
    if served is not None:
        content = paths["/score"]["post"]["requestBody"]["content"]["application/json"]
        content["examples"] = score_examples(served)
        for path, operations in paths.items():
            if path.startswith("/v2/models/"):
                _v2_examples(operations, served)
    errors = error_examples(features, settings)
    loading = {"loading": errors[503]["loading"]}
    draining = _example(
        "draining on SIGTERM: the load balancer stops sending, requests are still served",
        NotReady("shutting down: requests are still served while the load balancer drains").body(),
    )
    _add_errors(paths["/score"]["post"]["responses"], errors)
    _add_errors(paths["/model"]["get"]["responses"], {401: errors[401], 503: loading})
    _add_errors(paths["/readyz"]["get"]["responses"], {503: loading | {"draining": draining}})
    _add_errors(paths["/admin/reload"]["post"]["responses"], reload_error_examples(settings))


def _rounded(value: float) -> float:
    """Four significant digits: plausible to read, whatever the feature's scale."""
    return float(f"{value:.4g}")


def example_rows(served: Served) -> list[list[float]]:
    """The training rows' centre, and a row ten scales above it in every feature (four were enough
    for a deviation, not for the narrower interquartile range of a skewed feature); constant columns
    at their value exactly (rounded, it would differ from training)."""
    bundle = served.bundle
    scaler = bundle.scaler
    mean = dict(zip(bundle.features, map(_rounded, scaler.mean), strict=True)) | bundle.constants
    far = dict(zip(bundle.features, map(_rounded, scaler.mean + 10 * scaler.scale), strict=True))
    return [[mean[c] for c in bundle.columns], [(far | bundle.constants)[c] for c in bundle.columns]]


def score_examples(served: Served) -> dict[str, dict[str, Any]]:
    rows = example_rows(served)
    named: dict[str, Any] = {"instances": [dict(zip(served.bundle.columns, rows[0], strict=True))]}
    # The strictest threshold stored for the default method: a name the bundle is sure to resolve.
    stored = served.bundle.stored_thresholds.get(served.method, {})
    if stored:
        named["threshold"] = min(stored, key=lambda name: stored[name]["fpr"])
    named["components"] = True
    summary = "one row by feature name, with components"
    return {
        "rows": {
            "summary": "rows in feature order: the training centre, and a row far above it",
            "value": {"instances": rows},
        },
        "named": {
            "summary": summary + (f" and the threshold {named['threshold']}" if stored else ""),
            "value": named,
        },
    }


def _v2_examples(operations: dict[str, Any], served: Served) -> None:
    """The served model's name and version in the path, and for infer a tensor of its features."""
    values = {"name": served.bundle.name, "version": served.bundle.version}
    for operation in operations.values():
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path" and parameter["name"] in values:
                parameter["example"] = values[parameter["name"]]
        content = operation.get("requestBody", {}).get("content", {}).get("application/json")
        if content is not None:
            rows = example_rows(served)
            tensor = {"name": "x", "shape": [len(rows), len(rows[0])], "datatype": "FP64", "data": rows}
            content["example"] = {"inputs": [tensor]}


def _add_errors(responses: dict[str, Any], examples: Examples) -> None:
    for status, named in examples.items():
        response = responses.get(str(status))
        if response is None:  # an operation documents only the statuses it can answer
            continue
        response.setdefault("content", {}).setdefault("application/json", {})["examples"] = named
        if status == 503:
            response["headers"] = {"Retry-After": RETRY_AFTER}


def _raised(call: Callable[[], object]) -> dict[str, Any]:
    """The error document `call` answers with: the service's own message, not a paraphrase of it."""
    try:
        call()
    except ServiceError as e:
        return e.body()
    except UnknownMethod as e:  # as app.api.errors answers it
        return {"error": str(e), "detail": {"accepted": e.accepted}}
    raise RuntimeError("the documented error was not raised")


def _example(summary: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "value": value}


def _request(headers: dict[str, str]) -> Request:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


def _bad_json(features: list[str], settings: Settings, instances: list[Any]) -> Callable[[], object]:
    body = json.dumps({"instances": instances}).encode()
    return lambda: parse_json(body, features, settings.max_rows)


def _timeout(settings: Settings) -> dict[str, Any]:
    # The body arrives within app.api.body's read loop only; its message, rebuilt for a stalled upload.
    received, elapsed = 4096, 2.5
    return RequestTimeout(
        f"the body arrived slower than {settings.body_min_rate:g} bytes/s over "
        f"{settings.body_rate_window_s:g} s ({received} bytes in {elapsed} s)",
        {"received": received, "timeout_s": settings.body_timeout_s, "min_rate": settings.body_min_rate},
    ).body()


def _too_large(limit: int) -> dict[str, Any]:
    size = limit + 1
    return PayloadTooLarge(f"body of {size} bytes; the limit is {limit}", {"limit": limit}).body()


def _loading() -> dict[str, Any]:
    return NotReady("the model is still loading").body()


def error_examples(features: list[str], settings: Settings) -> Examples:
    """Errors of /score (and of /model and /readyz, which share the statuses they can answer)."""
    row = [1.0] * len(features)
    column = min(1, len(features) - 1)
    cell = [*row[:column], "n/a", *row[column + 1 :]]
    keyed = settings.model_copy(update={"api_keys": ["a-key"]})
    queue, rows, budget = settings.max_queue, settings.max_rows + 1, settings.max_inflight_body_bytes
    return {
        400: {
            "json": _example("malformed JSON", _raised(lambda: parse_json(b'{"instances": [[1.5,', [], 1)))
        },
        401: {"key": _example("no or a wrong API key", _raised(lambda: authorize(_request({}), keyed)))},
        408: {"slow": _example("the body arrived too slowly", _timeout(settings))},
        413: {
            "rows": _example(
                "too many rows",
                PayloadTooLarge(
                    f"{rows} rows in one request; the limit is {settings.max_rows}",
                    {"rows": rows, "limit": settings.max_rows},
                ).body(),
            ),
            "bytes": _example("body over the size limit", _too_large(settings.max_body_bytes)),
        },
        415: {
            "type": _example(
                "neither JSON nor .npy",
                UnsupportedMediaType(
                    f"content type 'text/csv'; send one of {CONTENT_TYPES}", {"accepted": CONTENT_TYPES}
                ).body(),
            ),
        },
        422: {
            "cell": _example("a value that is no number", _raised(_bad_json(features, settings, [cell]))),
            "width": _example(
                "a row of the wrong length", _raised(_bad_json(features, settings, [row[:-1]]))
            ),
            "query": _example(
                "query parameters on a JSON request",
                _raised(lambda: check_query("application/json", [("threshold", "0.05")])),
            ),
            "method": _example("an unknown score method", _raised(lambda: check_method("isolation_forest"))),
        },
        503: {
            "loading": _example("the model is still loading", _loading()),
            "queue": _example(
                "overloaded: the scoring queue is full",
                Overloaded(
                    f"{queue} scoring requests already queued; the limit is {queue}",
                    {"queued": queue, "limit": queue},
                ).body(),
            ),
            "memory": _example(
                "overloaded: the request bodies in flight fill the memory budget",
                _raised(lambda: BodyBudget(budget).take(budget + 1)),
            ),
        },
    }


def reload_error_examples(settings: Settings) -> Examples:
    with_admin = settings.model_copy(update={"admin_key": "the-admin-key"})
    without_admin = settings.model_copy(update={"admin_key": None})
    limit = settings.load_timeout_s
    return {
        400: {"json": _example("malformed JSON", _raised(lambda: parse_reload(b'{"path": ')))},
        401: {
            "key": _example(
                "no or a wrong admin key", _raised(lambda: authorize_admin(_request({}), with_admin))
            )
        },
        403: {
            "disabled": _example(
                "no admin key configured", _raised(lambda: authorize_admin(_request({}), without_admin))
            )
        },
        408: {"slow": _example("the body arrived too slowly", _timeout(settings))},
        409: {
            "busy": _example("another reload is running", Conflict("a reload is already in progress").body())
        },
        413: {"bytes": _example("body over the admin limit", _too_large(ADMIN_BODY_BYTES))},
        415: {
            "type": _example(
                "not JSON",
                UnsupportedMediaType(
                    "send the reload request as application/json", {"accepted": ["application/json"]}
                ).body(),
            )
        },
        422: {"path": _example("a path that is no string", _raised(lambda: parse_reload(b'{"path": 3}')))},
        503: {
            "timeout": _example(
                "the new bundle did not load in time; the old one serves on",
                LoadTimedOut(
                    f"loading models/next did not finish within {limit:g} s; it was abandoned and the "
                    "previous model keeps serving",
                    {"model_path": "models/next", "load_timeout_s": limit},
                ).body(),
            )
        },
    }
