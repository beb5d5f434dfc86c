"""Crafted input answers 4xx, never 500 (issue 15, defects 3 and 8 and the minor findings)."""

import io
import threading

import numpy as np
import pytest

from app.api import parsing, routes
from app.api.settings import Settings

from ..conftest import FEATURES
from .conftest import ready_client
from .test_errors import check, post

ROW = "[" + ",".join(["1"] * len(FEATURES)) + "]"
OBJECT_ROW = "{" + ",".join(f'"{f}": 1' for f in FEATURES)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        # A lone surrogate: orjson refuses it, Python's parser reads it into a str UTF-8 cannot hold.
        ('{"instances": [' + ROW + '], "\\ud800": 1}', 400, "not valid JSON"),
        ('{"instances": [' + OBJECT_ROW + ', "\\udfff": 1}]}', 400, "not valid JSON"),
        ('{"instances": [' + ROW + '], "method": "\\ud800"}', 400, "not valid JSON"),
        # Nested about 1000 deep: within orjson's limit, beyond Python's recursion in the key check.
        (
            '{"instances": [' + ROW + '], "threshold": ' + "[" * 1000 + "]" * 1000 + "}",
            422,
            "'threshold' must",
        ),
        ('{"instances": [' + ROW + '], "method": ' + "[" * 1000 + "]" * 1000 + "}", 422, "'method' must"),
        (
            '{"instances": [' + ROW + '], "method": ' + '{"a":' * 1000 + "1" + "}" * 1000 + "}",
            422,
            "'method'",
        ),
        ('{"instances": [' + ROW + ', "x"], "z": ' + "[" * 1000 + "]" * 1000 + "}", 422, "unknown fields"),
        ('{"instances": [' + "[" * 1100 + "]" * 1100 + "]}", 400, "not valid JSON"),
    ],
)
def test_crafted_json_is_refused_with_4xx(client, body, status, fragment):
    check(post(client, body), status, fragment)


def test_a_lying_npy_header_is_refused_before_anything_is_allocated(client):
    # More rows promised than sent (np.load would allocate what the header promises first).
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (400, len(FEATURES))}
    )
    lying = header.getvalue() + b"\x00" * 64
    check(post(client, lying, "application/x-npy"), 400, "promises (400, 6)", "holds 64")
    huge = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        huge, {"descr": "<f8", "fortran_order": False, "shape": (500_000_000, 30)}
    )
    check(post(client, huge.getvalue() + b"\x00" * 64, "application/x-npy"), 413, "500000000 rows")
    short = io.BytesIO()
    np.lib.format.write_array_header_1_0(short, {"descr": "<f8", "fortran_order": False, "shape": (2, 6)})
    check(post(client, short.getvalue() + b"\x00" * 95, "application/x-npy"), 400, "holds 95")


def test_a_fortran_ordered_npy_scores_like_its_c_ordered_copy(client):
    x = np.random.default_rng(3).standard_normal((5, len(FEATURES)))
    answers = []
    for array in (np.ascontiguousarray(x), np.asfortranarray(x)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        response = post(client, buffer.getvalue(), "application/x-npy")
        assert response.status_code == 200, response.text
        answers.append(response.json()["scores"])
    assert answers[0] == answers[1]


def test_compressed_bodies_and_stray_query_parameters_are_refused(client):
    body = '{"instances": [' + ROW + "]}"
    check(post(client, body, **{"content-encoding": "gzip"}), 415, "content encoding 'gzip'")
    response = client.post("/score?method=latent", content=body, headers={"content-type": "application/json"})
    check(response, 422, "unknown query parameters", "['method']")


def test_admin_routes_off_answer_403_whatever_the_body(client):
    for body in (b"\xff\xfe", b"[" * 10_000, b'{"path": 1}'):
        response = client.post("/admin/reload", content=body, headers={"content-type": "application/json"})
        check(response, 403, "admin routes are disabled")


def test_a_large_body_is_parsed_off_the_event_loop(tiny_bundle, monkeypatch):
    """Defect 8: bodies under 1 MiB were parsed on the event loop, and crafted ones blocked it for
    up to 0.8 s. Now only bodies that parse in milliseconds whatever they hold are (parse_is_cheap),
    and a crafted option is refused before the costlier duplicate-key pass."""
    threads = []
    original = routes.parse_json

    def recording(*args):
        threads.append(threading.current_thread().name)
        return original(*args)

    monkeypatch.setattr(routes, "parse_json", recording)
    client = ready_client(Settings(model_path=tiny_bundle, warmup_rows=4))
    try:
        crafted = '{"instances": [' + ROW + '], "method": [' + ",".join(["{}"] * 340_000) + "]}"
        assert 64 * 1024 < len(crafted) < 1024 * 1024
        check(post(client, crafted), 422, "'method' must be a string, got list")
        small = '{"instances": [' + ROW + "]}"
        assert post(client, small).status_code == 200
        numbers = '{"instances": [' + ",".join([ROW] * 9000) + "]}"  # rows of numbers, 64 KiB to 1 MiB
        assert 64 * 1024 < len(numbers) < 1024 * 1024
        assert post(client, numbers).status_code == 200
    finally:
        client.__exit__(None, None, None)
    crafted, small, numbers = threads
    assert crafted != small  # the crafted body: a worker thread; the small one: the event loop's
    assert numbers == small  # rows of numbers parse in milliseconds: not worth two GIL hand-offs


def test_a_large_body_orjson_refuses_is_located_not_parsed_again(client):
    """Hostile-client audit: a 16 MiB body of rows with one NaN went to Python's parser, which held
    the GIL (and the event loop) for 1.7 s. Above REPARSE_BYTES the refusal is located from orjson's
    position instead: row and column where the rows are lists of numbers, the text and its position
    otherwise, 422 either way, as a small body's non-finite value is. The wording differs from the
    reparsed path's ("is nan"), which shows which path answered."""
    n = 8000
    for literal in ("NaN", "-Infinity", "1e400"):
        rows = [ROW] * n
        rows[5000] = "[" + ",".join([literal if j == 3 else "1" for j in range(len(FEATURES))]) + "]"
        body = '{"instances": [' + ",".join(rows) + "]}"
        assert len(body) > parsing.REPARSE_BYTES
        check(post(client, body), 422, f"instances[5000], column 3 ('f3') is {literal}: only finite numbers")
    objects = [OBJECT_ROW + "}"] * 2000  # within the test settings' body limit
    objects[7] = objects[7].replace('"f2": 1', '"f2": NaN')
    text = '{"instances": [' + ",".join(objects) + "]}"
    body = check(post(client, text), 422, "holds NaN at character")
    assert body["detail"]["position"] == text.index("NaN")
    broken = '{"instances": [' + ",".join(objects).replace('"f2": 1', '"f2": 1x', 1) + "]}"
    check(post(client, broken), 400, "not valid JSON")  # text that is no value at all stays a 400
    for malformed in ("1.e5", "0x10", "1_000", "01", "nan"):  # re-audit: once called non-finite, 422
        rows = [ROW] * n
        rows[0] = "[" + ",".join([malformed if j == 3 else "1" for j in range(len(FEATURES))]) + "]"
        check(post(client, '{"instances": [' + ",".join(rows) + "]}"), 400, "not valid JSON")
    rows = [ROW] * n
    rows[9] = "[" + ",".join(["1" + "0" * 400 if j == 1 else "1" for j in range(len(FEATURES))]) + "]"
    huge = '{"instances": [' + ",".join(rows) + "]}"
    check(post(client, huge), 422, "instances[9], column 1", "limit is 1e+15")
    # Below the bound, Python's parser still reads it and check_values names the cell.
    small = '{"instances": [' + ROW + ",[1,1,1,NaN,1,1]]}"
    check(post(client, small), 422, "instances[1], column 3", "is nan")


def test_the_documented_schema_requires_a_non_empty_instances_array_as_the_service_does(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    instances = body["properties"]["instances"]
    assert "minLength" not in instances  # a string keyword: on an array it constrained nothing
    assert [branch["minItems"] for branch in instances["anyOf"]] == [1, 1]
    check(post(client, '{"instances": []}'), 422, "non-empty list of rows")
