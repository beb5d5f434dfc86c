"""application/x-npy bodies: the same scores as JSON, the same checks."""

import io

import numpy as np
import pytest

from ..conftest import manifold_rows, off_manifold_rows
from .test_errors import check

ROWS = np.r_[manifold_rows(15, seed=41), off_manifold_rows(5, seed=42)]


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def post_npy(client, body: bytes, **params):
    return client.post("/score", content=body, params=params, headers={"content-type": "application/x-npy"})


@pytest.mark.parametrize("dtype", [np.float32, np.float64, ">f8"])
def test_npy_scores_equal_json_scores(client, dtype):
    as_json = client.post(
        "/score",
        json={
            "instances": ROWS.astype(dtype).astype(np.float64).tolist(),
            "components": True,
            "method": "encoder",
        },
    ).json()
    as_npy = post_npy(client, npy(ROWS.astype(dtype)), components="true", method="encoder")
    assert as_npy.status_code == 200
    assert as_npy.json() == as_json


def test_npy_threshold_and_explain_as_query_parameters(client):
    body = post_npy(client, npy(ROWS), threshold="fpr_0.1", explain="1").json()
    assert body["threshold"]["name"] == "fpr_0.1"
    assert np.allclose(np.sum(body["explain"]["residual_share"], axis=1), 1.0)


def test_npy_refusals(client):
    bad = ROWS.copy()
    bad[3, 4] = np.nan
    check(post_npy(client, npy(bad)), 422, "instances[3], column 4 ('f4')", "nan")
    check(post_npy(client, npy(ROWS.astype(np.int64))), 422, "dtype is int64; send float32 or float64")
    check(post_npy(client, npy(ROWS[0])), 422, "shape (6,)")
    check(post_npy(client, npy(ROWS[:, :5])), 422, "the array has 5 columns; the model takes 6")
    # an object array is refused by its header, before numpy would unpickle anything
    check(post_npy(client, npy(np.array([{"a": 1}], dtype=object))), 422, "dtype is object")
    check(post_npy(client, b"\x93NUMPY garbage"), 400, "not a valid .npy")
    # numpy's own message quotes the header's parsed node with its address: not in an answer.
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1+1, 6), }".ljust(117) + "\n"
    crafted = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
    body = check(post_npy(client, crafted), 400, "not a valid .npy", "ast.BinOp")
    assert " at 0x" not in body["error"]
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (-1, 6), }".ljust(117) + "\n"
    negative = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
    check(post_npy(client, negative), 422, "shape (-1, 6); send a non-empty (rows, 6) matrix")
    # numpy's header check takes a boolean for an integer; reshape would then fail with a 500
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (True, 6), }".ljust(117) + "\n"
    boolean = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
    check(post_npy(client, boolean + ROWS[0].tobytes()), 422, "shape (True, 6)")
    # which of two values was meant is not the server's to guess
    twice = client.post(
        "/score?method=latent&method=encoder",
        content=npy(ROWS),
        headers={"content-type": "application/x-npy"},
    )
    check(twice, 422, "query parameters ['method'] given more than once")
    # a charset means nothing to a binary type: not judged
    labelled = {"content-type": "application/x-npy; charset=utf-16"}
    assert client.post("/score", content=npy(ROWS), headers=labelled).status_code == 200
    check(post_npy(client, npy(ROWS), colour="red"), 422, "unknown query parameters ['colour']")
    check(post_npy(client, npy(ROWS), explain="maybe"), 422, "'explain' must be true or false")
    check(post_npy(client, npy(np.zeros((501, 6)))), 413, "501 rows")
