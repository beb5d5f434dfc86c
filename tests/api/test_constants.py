"""A model trained with constant columns over HTTP (issue 17): rows carry every column, as lists,
by name, as .npy or as an Open Inference Protocol tensor, and a row that differs from a training
constant comes back flagged, p-value 0, with the column named, in every path."""

import numpy as np
import pytest

from app.api.settings import Settings
from app.engine.onnx_backend import OnnxScorer

from ..conftest import CONSTANT_COLUMNS, FEATURES, manifold_rows, with_constants
from .conftest import ready_client
from .test_npy import npy, post_npy
from .test_open_inference import binary_body, decode, tensor

ROWS = with_constants(manifold_rows(4, seed=30))
ROWS[1, CONSTANT_COLUMNS.index("site")] = 7.0
ROWS[2, CONSTANT_COLUMNS.index("zero")] = -1.0
MISMATCH = [[], ["site"], ["zero"], []]


@pytest.fixture(scope="module")
def served(constant_bundle):
    bundle = constant_bundle.bundle
    c = ready_client(Settings(model_path=bundle.path, max_rows=100, warmup_rows=4))
    yield c, bundle
    c.__exit__(None, None, None)


def check_flags(body: dict, bundle) -> None:
    assert body["constant_mismatch"] == MISMATCH
    assert body["is_anomaly"][1] and body["is_anomaly"][2]
    assert body["p_values"][1] == 0 and body["p_values"][2] == 0
    # The rows' scores are those of their features, whatever the differing values.
    expected = OnnxScorer(bundle).score(with_constants(manifold_rows(4, seed=30)))
    np.testing.assert_array_equal(body["scores"], expected.score)
    for i in (0, 3):
        assert body["p_values"][i] == expected.p_value[i]


def test_model_metadata_lists_columns_features_and_constants(served):
    client, _ = served
    body = client.get("/model").json()
    assert body["columns"] == CONSTANT_COLUMNS and body["features"] == FEATURES
    assert body["constants"] == {"site": 0.1, "zero": 0.0}


def test_rows_as_lists_by_name_and_as_npy_are_flagged_alike(served):
    client, bundle = served
    as_lists = client.post("/score", json={"instances": ROWS.tolist()})
    assert as_lists.status_code == 200
    check_flags(as_lists.json(), bundle)
    named = [dict(zip(CONSTANT_COLUMNS, row, strict=True)) for row in ROWS.tolist()]
    assert client.post("/score", json={"instances": named}).json() == as_lists.json()
    assert post_npy(client, npy(ROWS)).json() == as_lists.json()


def test_a_row_without_its_constant_columns_is_refused_naming_them(served):
    client, _ = served
    response = client.post("/score", json={"instances": [ROWS[0, :-1].tolist()]})
    assert response.status_code == 422
    assert "has 7 values; the model takes 8" in response.json()["error"]
    assert "f0, site, f1" in response.json()["error"]
    named = dict(zip(FEATURES, manifold_rows(1, seed=2)[0].tolist(), strict=True))
    response = client.post("/score", json={"instances": [named]})
    assert response.status_code == 422 and "missing features ['site', 'zero']" in response.json()["error"]


@pytest.mark.parametrize("binary", [False, True])
def test_open_inference_answers_constant_mismatch_as_a_rows_by_columns_tensor(served, binary):
    client, bundle = served
    path = f"/v2/models/{bundle.name}/infer"
    metadata = client.get(f"/v2/models/{bundle.name}").json()
    assert metadata["inputs"][0]["shape"] == [-1, len(CONSTANT_COLUMNS)]
    assert {"name": "constant_mismatch", "datatype": "BOOL", "shape": [-1, 2]} in metadata["outputs"]
    document = {"inputs": [tensor(ROWS)], "parameters": {"binary_data_output": binary}}
    response = client.post(path, json=document)
    assert response.status_code == 200
    outputs = decode(response)
    flags = outputs["constant_mismatch"]
    np.testing.assert_array_equal(flags, [[False, False], [True, False], [False, True], [False, False]])
    np.testing.assert_array_equal(outputs["p_value"][1:3], [0.0, 0.0])
    assert outputs["is_anomaly"][1:3].all()
    # Named outputs are answered as named: constant_mismatch only when asked for.
    asked = {"inputs": [tensor(ROWS)], "outputs": [{"name": "score"}]}
    assert [o["name"] for o in client.post(path, json=asked).json()["outputs"]] == ["score"]
    raw = ROWS.astype("<f8").tobytes()
    x = {
        "name": "x",
        "shape": list(ROWS.shape),
        "datatype": "FP64",
        "parameters": {"binary_data_size": len(raw)},
    }
    body, headers = binary_body({"inputs": [x]}, raw)
    response = client.post(path, content=body, headers=headers | {"content-type": "application/octet-stream"})
    assert response.status_code == 200
    assert decode(response)["constant_mismatch"].tolist() == flags.tolist()
