"""The Open Inference Protocol routes (/v2): every document checked against schemas written from the
specification (oip_schemas.py), answers equal to /score's, JSON and binary tensors, every error path."""

import json

import httpx
import jsonschema
import numpy as np
import pytest

from app.api.settings import Settings
from app.bundle.format import load_bundle

from ..conftest import FEATURES, manifold_rows, off_manifold_rows
from . import oip_schemas as spec
from .conftest import ready_client
from .test_metrics import scrape, value

D = len(FEATURES)
ROWS = np.r_[manifold_rows(4, seed=21), off_manifold_rows(3, seed=22)]


@pytest.fixture(scope="module")
def v2(tiny_bundle):
    c = ready_client(Settings(model_path=tiny_bundle, max_rows=500, warmup_rows=4))
    bundle = load_bundle(tiny_bundle)
    c.model, c.version = bundle.name, bundle.version
    yield c
    c.__exit__(None, None, None)


def infer_path(client, version: bool = False) -> str:
    return f"/v2/models/{client.model}" + (f"/versions/{client.version}" if version else "") + "/infer"


def tensor(rows: np.ndarray, datatype: str = "FP64", nested: bool = False) -> dict:
    data = rows.tolist() if nested else rows.ravel().tolist()
    return {"name": "x", "shape": list(rows.shape), "datatype": datatype, "data": data}


def binary_request(rows: np.ndarray = ROWS) -> dict:
    """A request for rows sent as binary FP64 data after the JSON."""
    x = {"name": "x", "shape": list(rows.shape), "datatype": "FP64"}
    return {"inputs": [x | {"parameters": {"binary_data_size": rows.nbytes}}]}


def binary_body(document: dict, *chunks: bytes) -> tuple[bytes, dict]:
    header = json.dumps(document).encode()
    return header + b"".join(chunks), {"Inference-Header-Content-Length": str(len(header))}


def decode(response) -> dict[str, np.ndarray]:
    """The outputs of a response, JSON or binary, as arrays (the binary extension's layout)."""
    length = response.headers.get("inference-header-content-length")
    body = response.content
    header = json.loads(body if length is None else body[: int(length)])
    jsonschema.validate(header, spec.INFER_RESPONSE)
    offset, arrays = int(length or 0), {}
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        dtype = {"FP64": "<f8", "BOOL": "?"}[output["datatype"]]
        if size is None:
            flat = np.asarray(output["data"], dtype=dtype)
        else:
            flat = np.frombuffer(body[offset : offset + size], dtype=dtype)
            offset += size
        # Tensor data is flat, row-major, whatever the shape
        assert flat.ndim == 1 and flat.size == np.prod(output["shape"])
        arrays[output["name"]] = flat.reshape(output["shape"])
    assert offset == (len(body) if length is not None else 0)
    return arrays


def score_answer(client, rows: np.ndarray, **options) -> dict:
    response = client.post("/score", json={"instances": rows.tolist(), "components": True, **options})
    assert response.status_code == 200
    return response.json()


def check_error(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    jsonschema.validate(body, spec.ERROR)  # {"error": "..."} and nothing else
    assert fragment in body["error"], body["error"]


def test_health_and_metadata_documents_follow_the_specification(v2):
    jsonschema.validate(v2.get("/v2/health/live").json(), spec.LIVE)
    ready = v2.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    server = v2.get("/v2").json()
    jsonschema.validate(server, spec.SERVER_METADATA)
    assert "binary_tensor_data" in server["extensions"]
    for path in (f"/v2/models/{v2.model}", f"/v2/models/{v2.model}/versions/{v2.version}"):
        metadata = v2.get(path).json()
        jsonschema.validate(metadata, spec.MODEL_METADATA)
        assert metadata["versions"] == [v2.version]
        assert metadata["inputs"] == [{"name": "x", "datatype": "FP64", "shape": [-1, D]}]
        ready = v2.get(f"{path}/ready").json()
        jsonschema.validate(ready, spec.MODEL_READY)
        assert ready == {"name": v2.model, "ready": True}


@pytest.mark.parametrize(("datatype", "nested", "version"), [("FP64", False, False), ("FP32", True, True)])
def test_json_inference_equals_score(v2, datatype, nested, version):
    rows = ROWS.astype(np.float32).astype(np.float64) if datatype == "FP32" else ROWS
    outputs = ["score", "is_anomaly", "p_value", "log_likelihood", "log_prior", "log_volume", "log_residual"]
    outputs.append("reconstruction_error")
    request = {
        "id": "abc",
        # MLServer's numpy codec marks its tensors content_type "np": what this input is anyway
        "inputs": [
            tensor(rows, datatype, nested) | ({"parameters": {"content_type": "np"}} if nested else {})
        ],
        "outputs": [{"name": n} for n in outputs],
    }
    response = v2.post(infer_path(v2, version), json=request)
    assert response.status_code == 200, response.text
    header = response.json()
    assert (
        header["id"] == "abc" and header["model_name"] == v2.model and header["model_version"] == v2.version
    )
    got, expected = decode(response), score_answer(v2, rows)
    assert header["parameters"]["method"] == expected["method"]
    assert header["parameters"]["threshold"] == expected["threshold"]["name"]
    np.testing.assert_array_equal(got["score"], expected["scores"])
    np.testing.assert_array_equal(got["is_anomaly"], expected["is_anomaly"])
    np.testing.assert_array_equal(got["p_value"], expected["p_values"])
    for name in ("log_likelihood", "log_prior", "log_volume", "log_residual", "reconstruction_error"):
        np.testing.assert_array_equal(got[name], expected[name])


def test_binary_tensors_in_and_out_equal_score(v2):
    request = {
        "inputs": [
            {
                "name": "x",
                "shape": [len(ROWS), D],
                "datatype": "FP64",
                "parameters": {"binary_data_size": ROWS.nbytes},
            }
        ],
        "outputs": [
            {"name": "score", "parameters": {"binary_data": True}},
            {"name": "is_anomaly", "parameters": {"binary_data": True}},
            {"name": "p_value"},
        ],
        "parameters": {"method": "latent", "threshold": 0.01},
    }
    body, headers = binary_body(request, ROWS.astype("<f8").tobytes())
    response = v2.post(infer_path(v2), content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    got, expected = decode(response), score_answer(v2, ROWS, method="latent", threshold=0.01)
    assert list(got) == ["score", "is_anomaly", "p_value"]
    np.testing.assert_array_equal(got["score"], expected["scores"])
    np.testing.assert_array_equal(got["is_anomaly"], expected["is_anomaly"])
    np.testing.assert_array_equal(got["p_value"], expected["p_values"])
    # binary_data_output: every output binary, unless an output says otherwise
    request = {"inputs": [tensor(ROWS)], "parameters": {"binary_data_output": True}}
    response = v2.post(infer_path(v2), json=request)
    header_length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:header_length])
    assert all("data" not in o for o in header["outputs"])
    np.testing.assert_array_equal(decode(response)["score"], score_answer(v2, ROWS)["scores"])


def with_value(rows: np.ndarray, i: int, j: int, value: float) -> np.ndarray:
    changed = rows.copy()
    changed[i, j] = value
    return changed


def bad(rows=ROWS, **changes) -> dict:
    request = {"inputs": [tensor(rows)]}
    for key, change in changes.items():
        if key.startswith("x_"):
            request["inputs"][0][key[2:]] = change
        else:
            request[key] = change
    return request


@pytest.mark.parametrize(
    ("request_body", "status", "fragment"),
    [
        (bad(x_name="input0"), 422, "this model's one input is 'x'"),
        (bad(x_datatype="INT64"), 422, "send one of ['FP32', 'FP64']"),
        (bad(x_datatype=["FP64"]), 422, "input 'x' has datatype list ['FP64']; send one of ['FP32', 'FP64']"),
        (bad(x_datatype={}), 422, "input 'x' has datatype dict {}; send one of ['FP32', 'FP64']"),
        (bad(x_shape=[len(ROWS), D + 1]), 422, f"send [rows, {D}]"),
        (bad(x_shape=[len(ROWS) + 1, D]), 422, "data has"),
        (bad(x_data=[1.0] * (len(ROWS) * D - 1) + ["1"]), 422, "expected a number, got str"),
        (bad(x_data=[True] * (len(ROWS) * D)), 422, "row 0, column 0 ('f0'): expected a number, got bool"),
        (bad(x_data=[1e300] * (len(ROWS) * D)), 422, "the limit is 1e+15"),
        (bad(with_value(ROWS, 3, 2, 1e300)), 422, "input 'x' row 3, column 2 ('f2') is 1e+300: the limit is"),
        (bad(x_extra=1), 422, "unknown input fields ['extra']"),
        (
            bad(x_parameters={"shared_memory_region": "r"}),
            422,
            "unknown input 'x' parameters ['shared_memory",
        ),
        (bad(x_parameters={"content_type": "pd"}), 422, "input 'x' content_type str 'pd': this model takes"),
        (
            bad(outputs=[{"name": "score", "parameters": {"classification": 2}}]),
            422,
            "unknown output 'score' parameters ['classification']; accepted: ['binary_data']",
        ),
        (bad(outputs=[{"name": "score", "shape": [1]}]), 422, "unknown outputs[0] fields ['shape']"),
        (bad(inputs=[]), 422, "exactly one tensor"),
        (bad(outputs=[{"name": "nope"}]), 422, "unknown output str 'nope'"),
        (bad(outputs=[{"name": "score"}, {"name": {}}]), 422, "outputs[1] 'name' must be a string, one of"),
        (bad(outputs=[{"name": "score"}, {"name": "score"}]), 422, "requested twice"),
        (bad(parameters={"priority": 1}), 422, "unknown parameters ['priority']"),
        (bad(parameters={"method": "nope"}), 422, "unknown score method"),
        (bad(parameters={"threshold": "fpr_0.00001"}), 422, "give a false-positive rate from 1/n"),
        (bad(parameters={"binary_data_output": "yes"}), 422, "must be true or false"),
        (bad(id=7), 422, "'id' must be a string"),
        (bad(model_name="other"), 422, "the path names"),
        (bad(extra=1), 422, "unknown fields ['extra']"),
        (bad(np.zeros((501, D))), 413, "501 rows in one request; the limit is 500"),
    ],
)
def test_refusals_are_the_protocols_error_documents(v2, request_body, status, fragment):
    check_error(v2.post(infer_path(v2), json=request_body), status, fragment)


# Every field of the request, with values of JSON types it does not take: each is refused as the
# client's error, naming the field, never a 500 (a list or an object once reached a dict lookup).
WRONG_TYPES = ({}, [[]], ["FP64"], "s", 7, True)
FIELDS = {  # path -> the types the field takes, which are no wrong type for it
    ("id",): (str,),
    ("model_name",): (),
    ("parameters",): (dict,),
    ("parameters", "method"): (str,),
    ("parameters", "threshold"): (str, int, float),
    ("parameters", "binary_data_output"): (bool,),
    ("inputs",): (),
    ("inputs", 0, "name"): (str,),
    ("inputs", 0, "shape"): (),
    ("inputs", 0, "datatype"): (str,),
    ("inputs", 0, "data"): (),
    ("inputs", 0, "parameters"): (dict,),
    ("inputs", 0, "parameters", "binary_data_size"): (),
    ("outputs",): (),
    ("outputs", 0, "name"): (str,),
    ("outputs", 0, "parameters"): (dict,),
    ("outputs", 0, "parameters", "binary_data"): (bool,),
}


@pytest.mark.parametrize("path", list(FIELDS), ids=lambda path: ".".join(map(str, path)))
def test_wrong_json_types_are_refused_naming_the_field(v2, path):
    for wrong in (v for v in WRONG_TYPES if type(v) not in FIELDS[path]):
        request = bad(parameters={}, outputs=[{"name": "score", "parameters": {}}])
        request["inputs"][0]["parameters"] = {}
        node = request
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = wrong
        response = v2.post(infer_path(v2), json=request)
        check_error(response, 422, str(path[-1]))


def post_raw_header(client, path: str, body: bytes, header: tuple[bytes, bytes]) -> httpx.Response:
    """POST with a header's bytes as a server passes them on: the TestClient re-encodes header
    values as UTF-8, so b"\\xb2" would reach the app as 'Â²', not as the '²' uvicorn gives it."""

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=client.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as raw:
            return await raw.post(path, content=body, headers=[header])

    # In the TestClient's event loop, where the app's scheduler runs
    return client.portal.call(post)


@pytest.mark.parametrize(
    "value",
    [b"\xb2", b"9" * 5000, b"1" * 21, b"12a", b"-1", b" "],
    ids=["superscript-two", "5000-digits", "21-digits", "letter", "negative", "blank"],
)
def test_header_length_takes_ascii_digits_only(v2, value):
    # '\xb2' (latin-1 '²') passes str.isdigit() but not int(); 5000 digits pass neither int() nor a
    # readable error message.
    body, _ = binary_body(binary_request(), ROWS.astype("<f8").tobytes())
    response = post_raw_header(v2, infer_path(v2), body, (b"Inference-Header-Content-Length", value))
    check_error(response, 400, "Inference-Header-Content-Length")
    assert len(response.json()["error"]) < 200


def test_non_finite_binary_values_name_the_input_row_and_column(v2):
    body, headers = binary_body(binary_request(), with_value(ROWS, 1, 4, np.nan).astype("<f8").tobytes())
    response = v2.post(infer_path(v2), content=body, headers=headers)
    check_error(response, 422, "input 'x' row 1, column 4 ('f4') is nan: only finite numbers can be scored")
    assert "instances" not in response.json()["error"]
    # The same in JSON, which orjson refuses: Python's parser reads it, as /score's does.
    row = ",".join(["NaN" if j == 4 else "1" for j in range(ROWS.shape[1])])
    document = '{"inputs": [{"name": "x", "shape": [2, %d], "datatype": "FP64", "data": [%s, %s]}]}'
    body = document % (ROWS.shape[1], ",".join(["1"] * ROWS.shape[1]), row)
    response = v2.post(infer_path(v2), content=body, headers={"content-type": "application/json"})
    check_error(response, 422, "input 'x' row 1, column 4 ('f4') is nan")


def test_malformed_bodies_and_binary_framing_are_refused(v2):
    path = infer_path(v2)
    check_error(
        v2.post(path, content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"
    )
    check_error(v2.post(path, content=b'{"inputs": [], "inputs": []}'), 422, "duplicate key 'inputs'")
    size = ROWS.nbytes
    request = {
        "inputs": [
            {
                "name": "x",
                "shape": list(ROWS.shape),
                "datatype": "FP64",
                "parameters": {"binary_data_size": size},
            }
        ]
    }
    body, headers = binary_body(request, ROWS.tobytes())
    check_error(v2.post(path, content=body + b"\x00", headers=headers), 400, "1 bytes after the binary data")
    # Audit finding: sent without the header, the JSON and the tensor's bytes read as one malformed
    # document, refused for "surrogates not allowed" at character 0, never pointing at the header.
    hint = "needs the Inference-Header-Content-Length header"
    for binary_part in (ROWS.tobytes(), b" 1.5"):  # bytes that are no UTF-8, and text
        response = v2.post(path, content=body[: len(body) - ROWS.nbytes] + binary_part)
        check_error(response, 400, "not valid")
        assert response.json()["error"].endswith(hint), response.json()
    # a plain syntax error is not told about the binary extension
    assert hint not in v2.post(path, content=b'{"inputs": [').json()["error"]
    check_error(v2.post(path, content=body[:-8], headers=headers), 400, f"promises {size} bytes")
    check_error(
        v2.post(path, content=body, headers={"Inference-Header-Content-Length": "x"}), 400, "byte count"
    )
    check_error(
        v2.post(path, content=body, headers={"Inference-Header-Content-Length": str(len(body) + 1)}),
        400,
        "byte count",
    )
    request["inputs"][0]["parameters"]["binary_data_size"] = size - 8
    body, headers = binary_body(request, ROWS.tobytes())
    check_error(v2.post(path, content=body, headers=headers), 422, f"takes {size} bytes")


def test_content_types_query_parameters_and_bounded_echoes(v2):
    """/v2 refuses what /score refuses, with the protocol's error document: a body that is no
    inference request (415), options in the query (they belong in 'parameters', 422), an integer
    threshold beyond any float (once a 500), and quotes of client input cut short."""
    path, document = infer_path(v2), json.dumps({"inputs": [tensor(ROWS)]}).encode()
    for content_type in ("application/json", "application/octet-stream", "application/json; charset=utf-8"):
        assert v2.post(path, content=document, headers={"content-type": content_type}).status_code == 200
    assert v2.post(path, content=document, headers={"content-type": ""}).status_code == 200  # some clients
    check_error(v2.post(path, content=document, headers={"content-type": "text/plain"}), 415, "'text/plain'")
    check_error(
        v2.post(path, content=document, headers={"content-type": "application/json; charset=latin-1"}),
        415,
        "charset 'latin-1'",
    )
    check_error(v2.post(path + "?method=latent", content=document), 422, "go in the body) ['method']")
    huge = {"inputs": [tensor(ROWS)], "parameters": {"threshold": 10**400}}
    check_error(v2.post(path, content=json.dumps(huge)), 422, "'threshold' must be a name or a rate")
    response = v2.post("/v2/models/" + "n" * 5000 + "/infer", content=document)
    check_error(response, 404, "unknown model 'nnn")
    assert len(response.content) < 500
    many = {"inputs": [tensor(ROWS)]} | {f"field{i}": 1 for i in range(1000)}
    response = v2.post(path, content=json.dumps(many))
    check_error(response, 422, "... (1000 in all)")
    assert len(response.content) < 1000
    # binary_data_size without the header that says where the JSON ends
    binary = {"inputs": [{"name": "x", "shape": list(ROWS.shape), "datatype": "FP64"}]}
    binary["inputs"][0]["parameters"] = {"binary_data_size": ROWS.nbytes}
    check_error(v2.post(path, content=json.dumps(binary)), 400, "Inference-Header-Content-Length header says")
    body, headers = binary_body(binary, ROWS.tobytes())
    twice = [(k, v) for k, v in headers.items()] * 2
    check_error(v2.post(path, content=body, headers=twice), 400, "given more than once")


def test_unknown_models_and_versions_are_404(v2):
    check_error(v2.post("/v2/models/nope/infer", json=bad()), 404, f"this server serves '{v2.model}'")
    check_error(v2.get(f"/v2/models/{v2.model}/versions/0000"), 404, f"serves version '{v2.version}'")
    check_error(v2.get(f"/v2/models/{v2.model}/versions/0000/ready"), 404, "has no version")
    check_error(v2.get("/v2/models/nope"), 404, "unknown model 'nope'")


def test_v2_shares_the_keys_metrics_and_limits_of_score(tiny_bundle):
    client = ready_client(
        Settings(model_path=tiny_bundle, api_keys=["k"], max_body_bytes=4096, warmup_rows=4)
    )
    try:
        model = load_bundle(tiny_bundle).name
        path = f"/v2/models/{model}/infer"
        check_error(client.post(path, json=bad()), 401, "API key")
        check_error(client.get(f"/v2/models/{model}"), 401, "API key")
        assert client.get("/v2/health/ready").status_code == 200  # probes need no key
        key = {"X-API-Key": "k"}
        assert client.post(path, json=bad(), headers=key).status_code == 200
        big = bad(np.zeros((400, D)))
        check_error(client.post(path, json=big, headers=key), 413, "the limit is 4096")
        check_error(client.post(path, json=bad(), headers=key | {"content-encoding": "gzip"}), 415, "gzip")
        samples = scrape(client)
        assert value(samples, "anomaly_requests_total", endpoint="/v2/infer", code="200") == 1
        assert value(samples, "anomaly_requests_total", endpoint="/v2/infer", code="413") == 1
        assert value(samples, "anomaly_requests_total", endpoint="/v2/models", code="401") == 1
        assert value(
            samples,
            "anomaly_rows_scored_total",
            model=model,
            version=load_bundle(tiny_bundle).version,
            method="likelihood",
        ) == len(ROWS)
    finally:
        client.__exit__(None, None, None)
