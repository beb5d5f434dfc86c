"""The Open Inference Protocol's REST routes (KServe V2, MLServer, Triton): health, metadata, infer.

Thin, as the /score routes are: keys, limits, back-pressure, metrics and logs are the same ones
(app.api.scoring below both); app.api.inference_protocol parses and encodes the documents. Errors
are the protocol's `{"error": "..."}` (app.api.errors answers every /v2 path so).
"""

from __future__ import annotations

import reprlib
from importlib import metadata

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api import schemas
from app.api.auth import authorize
from app.api.body import media_type
from app.api.errors import BadRequest, NotFound, json_response
from app.api.inference_protocol import (
    DEFAULT_OUTPUTS,
    EXTENSIONS,
    HEADER_LENGTH,
    INPUT,
    OUTPUTS,
    encode_response,
    parse_infer,
)
from app.api.parsing import check_query
from app.api.scoring import score_body
from app.api.service import Service
from app.engine.host import Served

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])
V2_CONTENT_TYPES = ["application/json", "application/octet-stream"]
ERRORS = {code: {"model": schemas.V2Error} for code in (400, 401, 404, 408, 413, 415, 422, 500, 503)}


def _service(request: Request) -> Service:
    return request.app.state.service


def _served(service: Service, name: str, version: str | None) -> Served:
    """The served model, if it is the one the path names (and the version, when the path has one)."""
    served = service.host.served
    bundle = served.bundle
    if name != bundle.name:
        raise NotFound(
            f"unknown model {reprlib.repr(name)}; this server serves {bundle.name!r}",
            {"models": [bundle.name]},
        )
    if version is not None and version != bundle.version:
        raise NotFound(
            f"model {name!r} has no version {reprlib.repr(version)}; it serves version {bundle.version!r}",
            {"versions": [bundle.version]},
        )
    return served


@router.get(
    "",
    summary="Server metadata",
    description="The server's name, version and protocol extensions.",
    responses={200: {"model": schemas.V2ServerMetadata}, **ERRORS},
)
async def server_metadata(request: Request) -> Response:
    authorize(request, _service(request).settings)
    version = metadata.version("anomaly-scores")
    return json_response({"name": "anomaly-scores", "version": version, "extensions": EXTENSIONS})


@router.get(
    "/health/live",
    summary="Server live",
    description="Liveness: true as soon as the process answers.",
    responses={200: {"model": schemas.V2Live}},
)
async def live() -> Response:
    return json_response({"live": True})


@router.get(
    "/health/ready",
    summary="Server ready",
    description="Readiness: true (200) once the model is loaded and warmed up, false (503) before and "
    "while draining.",
    responses={200: {"model": schemas.V2Ready}, 503: {"model": schemas.V2Ready}},
)
async def ready(request: Request) -> Response:
    service = _service(request)
    is_ready = service.host.current is not None and not service.draining
    return json_response({"ready": is_ready}, 200 if is_ready else 503)


async def _model_metadata(request: Request, name: str, version: str | None) -> Response:
    service = _service(request)
    authorize(request, service.settings)
    bundle = _served(service, name, version).bundle
    d, c = len(bundle.columns), len(bundle.constants)
    shapes = {"constant_mismatch": [-1, c]}
    return json_response(
        {
            "name": bundle.name,
            "versions": [bundle.version],
            "platform": f"anomaly-scores_{service.settings.backend}",
            "inputs": [{"name": INPUT, "datatype": "FP64", "shape": [-1, d]}],
            "outputs": [
                {"name": n, "datatype": t, "shape": shapes.get(n, [-1])} for n, (t, _) in OUTPUTS.items()
            ],
        }
    )


async def _model_ready(request: Request, name: str, version: str | None) -> Response:
    service = _service(request)
    authorize(request, service.settings)
    _served(service, name, version)
    is_ready = not service.draining
    return json_response({"name": name, "ready": is_ready}, 200 if is_ready else 503)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    service = _service(request)
    authorize(request, service.settings)
    served = _served(service, name, version)
    # The protocol's clients send JSON, or JSON then tensors (octet-stream), some without a
    # Content-Type; anything else is not an inference request. Its options live in the body.
    media_type(request, V2_CONTENT_TYPES, missing="application/json")
    check_query("application/json", request.query_params.multi_items())
    lengths = request.headers.getlist(HEADER_LENGTH)
    if len(lengths) > 1:
        raise BadRequest(f"{HEADER_LENGTH} given more than once", {"values": [v[:40] for v in lengths]})
    header_length = lengths[0] if lengths else None
    columns, max_rows = served.bundle.columns, service.settings.max_rows
    # A binary body's JSON header is small and its tensor is read in place, as a .npy body's is.
    kind = "application/x-npy" if header_length is not None else "application/json"
    parsed, out = await score_body(
        request,
        service,
        served,
        kind,
        lambda body: parse_infer(body, header_length, name, columns, max_rows),
    )
    body, headers = encode_response((served.bundle.name, served.bundle.version), out, parsed)
    media = "application/octet-stream" if headers else "application/json"
    return Response(body, media_type=media, headers=headers)


METADATA_DOC = "The served model's input tensor 'x' ([rows, features]) and outputs; 404 for another model."
READY_DOC = "Whether the named model is served and ready; 404 for another model."
INFER_DOC = {
    "summary": "Infer: score the rows of input 'x'",
    "description": f"Input 'x' (FP32 or FP64, [rows, features]); outputs {list(OUTPUTS)} (default "
    f"{list(DEFAULT_OUTPUTS)}); parameters method, threshold, binary_data_output; the binary tensor "
    "data extension (Inference-Header-Content-Length).",
    "responses": {200: {"model": schemas.V2InferResponse}, **ERRORS},
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schemas.V2InferRequest.model_json_schema()},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "the JSON request (Inference-Header-Content-Length bytes), then the "
                    "binary tensor data",
                },
            },
        }
    },
}


@router.get(
    "/models/{name}",
    summary="Model metadata",
    description=METADATA_DOC,
    responses={200: {"model": schemas.V2ModelMetadata}, **ERRORS},
)
async def model_metadata(request: Request, name: str) -> Response:
    return await _model_metadata(request, name, None)


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model metadata, by version",
    description=METADATA_DOC,
    responses={200: {"model": schemas.V2ModelMetadata}, **ERRORS},
)
async def model_version_metadata(request: Request, name: str, version: str) -> Response:
    return await _model_metadata(request, name, version)


@router.get(
    "/models/{name}/ready",
    summary="Model ready",
    description=READY_DOC,
    responses={200: {"model": schemas.V2ModelReady}, **ERRORS},
)
async def model_ready(request: Request, name: str) -> Response:
    return await _model_ready(request, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Model ready, by version",
    description=READY_DOC,
    responses={200: {"model": schemas.V2ModelReady}, **ERRORS},
)
async def model_version_ready(request: Request, name: str, version: str) -> Response:
    return await _model_ready(request, name, version)


@router.post("/models/{name}/infer", **INFER_DOC)
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", **INFER_DOC)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)
