"""The Open Inference Protocol (KServe V2, spoken by MLServer and Triton): its request and response
documents, JSON and with the binary tensor data extension, for the scorer below /score.

One input tensor `x`, FP32 or FP64, shape [n, d], the bundle's columns in order (GET /model's
`columns`): `data` flat
(row-major) or nested, or, with the binary extension, n*d little-endian values after the JSON header
(`Inference-Header-Content-Length` bytes). Request parameters: `method`, `threshold` (a name such as
fpr_0.01, or a calibrated rate) and `binary_data_output`. Outputs, all [n] FP64 but `is_anomaly`
BOOL [n] and `constant_mismatch` BOOL [n, c] (c: the model's constant columns): OUTPUT_NAMES; without
`outputs` in the request, DEFAULT_OUTPUTS, and `constant_mismatch` where c > 0. Each output is JSON
or binary (`parameters.binary_data`, else the request's `binary_data_output`).
Specification: github.com/kserve/open-inference-protocol, specification/protocol/inference_rest.md.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from app.api.errors import BadRequest, PayloadTooLarge
from app.api.parsing import (
    Body,
    ScoreRequest,
    check_values,
    describe,
    load_json,
    quoted,
    reject_duplicate_keys,
)
from app.engine.errors import InvalidInput
from app.engine.scorer import ScoreOutput

INPUT = "x"
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]
# name -> (datatype, the ScoreOutput field); p_value and the parts as /score names them
OUTPUTS: dict[str, tuple[str, str]] = {
    "score": ("FP64", "score"),
    "is_anomaly": ("BOOL", "is_anomaly"),
    "p_value": ("FP64", "p_value"),
    "log_likelihood": ("FP64", "log_likelihood"),
    "log_prior": ("FP64", "log_prior"),
    "log_volume": ("FP64", "log_volume"),
    "log_residual": ("FP64", "log_residual"),
    "reconstruction_error": ("FP64", "reconstruction_error"),
    # [n, c] for a model with c constant columns (in GET /model's `constants` order): the row's value
    # differs there
    "constant_mismatch": ("BOOL", "constant_mismatch"),
}
OUTPUT_NAMES = tuple(OUTPUTS)
DEFAULT_OUTPUTS = ("score", "is_anomaly", "p_value", "log_likelihood")
INPUT_DTYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
WIRE_DTYPES = {"FP64": np.dtype("<f8"), "BOOL": np.dtype("u1")}  # binary outputs, little-endian
# model_name: not in the specification's request, but KServe's client sends it
REQUEST_KEYS = ("id", "model_name", "parameters", "inputs", "outputs")
REQUEST_PARAMETERS = ("method", "threshold", "binary_data_output")
INPUT_KEYS = ("name", "shape", "datatype", "parameters", "data")
# binary_data_size: the binary extension's; content_type: MLServer's codecs send "np" for a tensor
INPUT_PARAMETERS = ("binary_data_size", "content_type")
OUTPUT_KEYS = ("name", "parameters")
# Triton's classification extension (parameters.classification) is not offered: refused by name,
# not answered as if it had not been asked.
OUTPUT_PARAMETERS = ("binary_data",)
# str.isdigit() admits digits int() refuses ('²'), and int() refuses more than 4300 digits: ASCII
# digits only, and no more than a 64-bit count takes.
HEADER_LENGTH_FORM = re.compile("[0-9]{1,20}")


@dataclass(frozen=True)
class InferRequest(ScoreRequest):
    id: str | None = None
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    binary: frozenset[str] = field(default_factory=frozenset)  # outputs answered as binary data
    # No `outputs` in the request: the model's constant_mismatch is added where it has constant columns.
    default_outputs: bool = True


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {describe(value)}")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{what} must be true or false, got {describe(value)}")
    return value


def _header_and_binary(body: Body, header_length: str | None) -> tuple[Any, memoryview]:
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        if HEADER_LENGTH_FORM.fullmatch(header_length) is None or int(header_length) > len(body):
            # reprlib: the value may be thousands of characters long
            raise BadRequest(
                f"Inference-Header-Content-Length {reprlib.repr(header_length)} must be a byte count "
                f"(digits 0-9) within the body's {len(body)} bytes"
            )
        split = int(header_length)
        json_part, binary = memoryview(body)[:split], memoryview(body)[split:]
    try:
        doc = load_json(json_part, what="the inference request")
    except BadRequest as e:
        # A binary request sent without the header reads as JSON with bytes after it: not UTF-8, or
        # valid text after the document.
        after = ("not valid UTF-8", "unexpected content after document")
        if header_length is not None or not any(reason in e.message for reason in after):
            raise
        hint = "; a request with binary tensor data needs the Inference-Header-Content-Length header"
        raise BadRequest(e.message + hint, e.detail, e.headers) from None
    reject_duplicate_keys(bytes(json_part) if isinstance(json_part, memoryview) else json_part, doc)
    return doc, binary


def _input_rows(
    tensor: dict[str, Any], binary: memoryview, features: list[str], max_rows: int
) -> tuple[NDArray[np.float64], int]:
    """The (n, d) rows of the input tensor and how many binary bytes it used."""
    _known(tensor, INPUT_KEYS, "input fields")
    name, d = tensor.get("name"), len(features)
    if name != INPUT:
        raise InvalidInput(
            f"input name {describe(name)}: this model's one input is {INPUT!r}", {"accepted": [INPUT]}
        )
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in INPUT_DTYPES:  # a list or object is unhashable
        raise InvalidInput(
            f"input 'x' has datatype {describe(datatype)}; send one of {list(INPUT_DTYPES)}",
            {"accepted": list(INPUT_DTYPES)},
        )
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(type(s) is int for s in shape)
        or shape[1] != d
        or shape[0] < 1
    ):
        raise InvalidInput(
            f"input 'x' has shape {describe(shape)}; send [rows, {d}], the features in this order: "
            f"{', '.join(features)}",
            {"expected": [-1, d]},
        )
    n = shape[0]
    if n > max_rows:
        raise PayloadTooLarge(
            f"{n} rows in one request; the limit is {max_rows}", {"rows": n, "limit": max_rows}
        )
    parameters = _object(tensor.get("parameters", {}), "input 'x' parameters")
    _known(parameters, INPUT_PARAMETERS, "input 'x' parameters")
    content_type = parameters.get("content_type", "np")
    if content_type != "np":
        raise InvalidInput(
            f"input 'x' content_type {describe(content_type)}: this model takes one tensor, 'np'",
            {"accepted": ["np"]},
        )
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise InvalidInput("input 'x' has both data and binary_data_size; send one")
        dtype = INPUT_DTYPES[datatype]
        expected = n * d * dtype.itemsize
        if type(size) is not int or size != expected:
            raise InvalidInput(
                f"input 'x' binary_data_size is {describe(size)}; {shape} {datatype} takes {expected} bytes"
            )
        if len(binary) < size:
            # Without the header the whole body is the JSON request, and no byte is left for tensors.
            hint = "" if binary else " (the Inference-Header-Content-Length header says where the JSON ends)"
            raise BadRequest(
                f"input 'x' promises {size} bytes of binary data; the body holds {len(binary)}{hint}"
            )
        x = np.frombuffer(binary[:size], dtype=dtype).reshape(n, d)
        return np.asarray(x, dtype=np.float64), size
    if "data" not in tensor:
        raise InvalidInput("input 'x' has no data: send data, or binary_data_size with the binary extension")
    return _json_rows(tensor["data"], n, d, features), 0


def _json_rows(data: Any, n: int, d: int, features: list[str]) -> NDArray[np.float64]:
    if not isinstance(data, list):
        raise InvalidInput(f"input 'x' data must be an array, got {describe(data)}")
    flat = data
    if data and all(type(row) is list for row in data):  # nested: [[...], ...], one list per row
        if len(data) != n or any(len(row) != d for row in data):
            raise InvalidInput(f"input 'x' data must be {n} rows of {d} values, as its shape says")
        flat = list(itertools.chain.from_iterable(data))
    if len(flat) != n * d:
        raise InvalidInput(f"input 'x' data has {len(flat)} values; its shape [{n}, {d}] takes {n * d}")
    kinds = set(map(type, flat))
    if not kinds <= {int, float}:  # bool is its own type: true and false are no measurements either
        k = next(i for i, v in enumerate(flat) if type(v) not in (int, float))
        i, j = divmod(k, d)
        raise InvalidInput(
            f"input 'x' row {i}, column {j} ('{features[j]}'): expected a number, got {describe(flat[k])}",
            {"row": i, "column": features[j]},
        )
    try:
        return np.array(flat, dtype=np.float64).reshape(n, d)
    except OverflowError:  # an integer beyond any float
        raise InvalidInput("input 'x' holds an integer too large for a float") from None


def _known(mapping: dict[str, Any], accepted: tuple[str, ...], what: str) -> None:
    """Refuse keys of `mapping` outside `accepted`: a misspelt option silently ignored would answer
    a question the client did not ask."""
    unknown = quoted([k for k in mapping if k not in accepted])
    if unknown:
        raise InvalidInput(
            f"unknown {what} {unknown}; accepted: {list(accepted)}",
            {"unknown": unknown, "accepted": list(accepted)},
        )


def _outputs(doc: dict[str, Any], binary_default: bool) -> tuple[tuple[str, ...], frozenset[str]]:
    requested = doc.get("outputs")
    if requested is None:
        return DEFAULT_OUTPUTS, frozenset(DEFAULT_OUTPUTS if binary_default else ())
    if not isinstance(requested, list) or not requested:
        raise InvalidInput("'outputs' must be a non-empty array of {\"name\": ...} objects")
    names, binary = [], set()
    for k, item in enumerate(requested):
        output = _object(item, "each of 'outputs'")
        _known(output, OUTPUT_KEYS, f"outputs[{k}] fields")
        name = output.get("name")
        if not isinstance(name, str):  # a list or object is unhashable: no lookup in OUTPUTS
            raise InvalidInput(
                f"outputs[{k}] 'name' must be a string, one of {list(OUTPUT_NAMES)}; got {describe(name)}",
                {"accepted": list(OUTPUT_NAMES)},
            )
        if name not in OUTPUTS:
            raise InvalidInput(
                f"unknown output {describe(name)}; this model's outputs: {list(OUTPUT_NAMES)}",
                {"accepted": list(OUTPUT_NAMES)},
            )
        if name in names:
            raise InvalidInput(f"output {name!r} requested twice")
        parameters = _object(output.get("parameters", {}), f"output {name!r} parameters")
        _known(parameters, OUTPUT_PARAMETERS, f"output {name!r} parameters")
        if _flag(parameters.get("binary_data", binary_default), f"output {name!r} binary_data"):
            binary.add(name)
        names.append(name)
    return tuple(names), frozenset(binary)


def parse_infer(
    body: Body, header_length: str | None, model: str, columns: list[str], max_rows: int
) -> InferRequest:
    doc, binary = _header_and_binary(body, header_length)
    doc = _object(doc, "the inference request")
    _known(doc, REQUEST_KEYS, "fields")
    if doc.get("model_name", model) != model:
        raise InvalidInput(f"'model_name' is {describe(doc['model_name'])}, the path names {model!r}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {describe(request_id)}")
    parameters = _object(doc.get("parameters", {}), "'parameters'")
    _known(parameters, REQUEST_PARAMETERS, "parameters")
    method = parameters.get("method")
    if method is not None and not isinstance(method, str):
        raise InvalidInput(f"parameter 'method' must be a string, got {describe(method)}")
    threshold = parameters.get("threshold")
    if isinstance(threshold, int | float) and not isinstance(threshold, bool):
        with contextlib.suppress(OverflowError):  # an integer beyond any float is refused below
            threshold = float(threshold)
    if threshold is not None and not isinstance(threshold, str | float):
        raise InvalidInput(f"parameter 'threshold' must be a name or a rate, got {describe(threshold)}")
    binary_default = _flag(parameters.get("binary_data_output", False), "parameter 'binary_data_output'")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise InvalidInput(f"'inputs' must hold exactly one tensor, {INPUT!r}; got {describe(inputs)}")
    x, used = _input_rows(_object(inputs[0], "each of 'inputs'"), binary, columns, max_rows)
    if used != len(binary):
        raise BadRequest(f"the body holds {len(binary) - used} bytes after the binary data of its inputs")
    check_values(x, columns, lambda i: f"input {INPUT!r} row {i}")
    outputs, binary_outputs = _outputs(doc, binary_default)
    if "outputs" not in doc and binary_default:
        binary_outputs |= {"constant_mismatch"}
    return InferRequest(
        x=x,
        method=method,
        threshold=threshold,
        id=request_id,
        outputs=outputs,
        binary=binary_outputs,
        default_outputs="outputs" not in doc,
    )


def encode_response(
    model: tuple[str, str], out: ScoreOutput, request: InferRequest
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON alone, or JSON then the binary outputs in order."""
    outputs, chunks = [], []
    names = request.outputs
    if request.default_outputs and out.constant_mismatch.shape[1]:
        names += ("constant_mismatch",)
    for name in names:
        datatype, attribute = OUTPUTS[name]
        values = getattr(out, attribute)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if name in request.binary:
            raw = np.ascontiguousarray(values, dtype=WIRE_DTYPES[datatype]).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = values.ravel() if values.ndim > 1 else values
        outputs.append(tensor)
    threshold = out.threshold
    document: dict[str, Any] = {"model_name": model[0], "model_version": model[1]}
    if request.id is not None:
        document["id"] = request.id
    document["parameters"] = {
        "method": out.method,
        "threshold": threshold.name,
        "threshold_fpr": threshold.fpr,
        "threshold_value": threshold.value,
    }
    document["outputs"] = outputs
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {}
    return b"".join([header, *chunks]), {"Inference-Header-Content-Length": str(len(header))}
