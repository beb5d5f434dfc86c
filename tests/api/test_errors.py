"""Every refusal: status, {"error", "detail"} shape, and a message naming the row, column or limit."""

import json
import time

import pytest

from app.api.parsing import _normalisation_hint as _hint
from app.api.settings import Settings

from ..conftest import FEATURES
from .conftest import ready_client

ROW = [1.0] * len(FEATURES)


def post(client, body: bytes | str, content_type: str = "application/json", **headers):
    data = body.encode() if isinstance(body, str) else body
    return client.post("/score", content=data, headers={"content-type": content_type, **headers})


def check(response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body["error"])
    return body


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ('{"instances": [[1,1,1,1,1,1],[1,1,NaN,1,1,1]]}', ["instances[1]", "column 2 ('f2')", "nan"]),
        ('{"instances": [[1,1,1,1,1,Infinity]]}', ["instances[0]", "column 5 ('f5')", "inf"]),
        ('{"instances": [[1,1,1,1,1e999,1]]}', ["instances[0]", "column 4 ('f4')", "finite"]),
        ('{"instances": [[1,1,1,1,1,1e300]]}', ["column 5 ('f5')", "the limit is 1e+15"]),
        ('{"instances": [[1,1,1,1,1,1' + "0" * 400 + "]]}", ["column 5 ('f5') is int", "the limit is 1e+15"]),
        ('{"instances": [[1,1,1,1,1,1]], "threshold": 1' + "0" * 400 + "}", ["'threshold' must be"]),
        ('{"instances": [[1,1,"x",1,1,1]]}', ["instances[0], column 2 ('f2'): expected a number, got str"]),
        ('{"instances": [[1,1,1,true,1,1]]}', ["column 3 ('f3'): expected a number, got bool"]),
        ('{"instances": [[1,1,1,1,1,null]]}', ["column 5 ('f5'): expected a number, got NoneType"]),
        ('{"instances": [[1,1,1,1,1]]}', ["instances[0] has 5 values; the model takes 6 features", "f0, f1"]),
        ('{"instances": [[1,1,1,1,1,1],[1,1,1]]}', ["instances[1] has 3 values"]),
        ('{"instances": [[1,1,1,1,1,1], 5]}', ["instances[1] is a int"]),
        ('{"instances": []}', ["non-empty list"]),
        ('{"instances": {"f0": 1}}', ["non-empty list"]),
        ('{"rows": [[1,1,1,1,1,1]]}', ["unknown fields ['rows']"]),
        ('{"method": "likelihood"}', ["'instances' is missing"]),
        ("[[1,1,1,1,1,1]]", ["must be a JSON object"]),
        ('{"instances": [[1,1,1,1,1,1]], "method": "nope"}', ["unknown score method 'nope'", "likelihood"]),
        ('{"instances": [[1,1,1,1,1,1]], "method": 3}', ["'method' must be a string"]),
        (
            '{"instances": [[1,1,1,1,1,1]], "threshold": "fpr_0.00001"}',
            [
                "threshold 'fpr_0.00001': give a false-positive rate from 1/n",
                "calibrated at training",
                "fpr_0.1",
            ],
        ),
        ('{"instances": [[1,1,1,1,1,1]], "threshold": 1.5}', ["threshold 1.5: give a false-positive rate"]),
        ('{"instances": [[1,1,1,1,1,1]], "threshold": "high"}', ["threshold 'high': give a false-positive"]),
        # a rate is a plain decimal number: not float()'s underscores, other scripts' digits or "nan"
        ('{"instances": [[1,1,1,1,1,1]], "threshold": "0.1_0"}', ["threshold '0.1_0': give a"]),
        ('{"instances": [[1,1,1,1,1,1]], "threshold": "\u0660.\u0665"}', ["give a false-positive rate"]),
        ('{"instances": [[1,1,1,1,1,1]], "threshold": "nan"}', ["threshold 'nan': give a"]),
        ('{"instances": [[1,1,1,1,1,1]], "threshold": 1}', ["threshold 1.0:", "and below 1"]),
        ('{"instances": [[1,1,1,1,1,1]], "components": "yes"}', ["'components' must be true or false"]),
    ],
)
def test_invalid_input_is_422_naming_the_problem(client, body, fragments):
    check(post(client, body), 422, *fragments)


def test_named_rows_with_missing_or_unknown_features_are_422(client):
    row = dict(zip(FEATURES, ROW, strict=True))
    missing = {k: v for k, v in row.items() if k != "f3"}
    body = check(
        post(client, json.dumps({"instances": [row, missing]})),
        422,
        "instances[1]",
        "missing features ['f3']",
    )
    assert body["detail"] == {"row": 1, "missing": ["f3"], "unknown": []}
    extra = row | {"f9": 2.0}
    check(post(client, json.dumps({"instances": [extra]})), 422, "unknown features ['f9']")
    check(post(client, json.dumps({"instances": [row, ROW]})), 422, "instances[1] is a list")
    check(post(client, json.dumps({"instances": [row | {"f0": "1"}]})), 422, "column 0 ('f0')")


def test_an_error_quotes_a_bounded_part_of_what_the_client_sent(client):
    """A row of thousands of unknown keys, or a method name of 150 000 characters, is refused in a few hundred
    bytes: the first names, each cut, and how many there were."""
    row = dict(zip(FEATURES, ROW, strict=True)) | {f"k{i:05d}" + "x" * 100: 1 for i in range(1500)}
    response = post(client, json.dumps({"instances": [row]}))
    body = check(response, 422, "unknown features ['k00000", "... (1500 in all)")
    assert len(response.content) < 2000
    assert len(body["detail"]["unknown"]) == 9
    response = post(client, json.dumps({"instances": [ROW], "method": "m" * 150_000}))
    check(response, 422, "unknown score method 'mmm")
    assert len(response.content) < 1000
    response = post(client, json.dumps({"instances": [ROW], "threshold": "t" * 150_000}))
    check(response, 422, "threshold 'ttt")
    assert len(response.content) < 1000


def test_object_rows_name_what_is_wrong_with_their_keys(client):
    row = dict(zip(FEATURES, ROW, strict=True))
    check(post(client, json.dumps({"instances": [row], "id_key": "f2"})), 422, "'id_key' 'f2' is a feature")
    decomposed = [{("f\u0301" + k[1:] if k == "f0" else k): v for k, v in row.items()}]
    check(post(client, json.dumps({"instances": decomposed})), 422, "missing features ['f0']")  # not f+accent
    # a feature named e-acute, sent decomposed (they print alike), is named as such
    assert "Unicode normal form" in _hint(["\u00e9"], {"e\u0301": 1.0})
    assert _hint(["\u00e9"], {"e": 1.0}) == ""


def test_duplicate_keys_and_deep_nesting_are_refused(client):
    check(
        post(client, '{"instances": [[1,1,1,1,1,1]], "method": "latent", "method": "likelihood"}'),
        422,
        "duplicate key 'method'",
    )
    row = ",".join(f'"f{i}": 1' for i in range(6))
    check(post(client, '{"instances": [{' + row + ', "f0": 2}]}'), 422, "duplicate key 'f0'")
    check(post(client, '{"instances": ' + "[" * 50_000 + "]" * 50_000 + "}"), 400, "not valid JSON")
    assert client.get("/healthz").status_code == 200


def test_malformed_json_and_wrong_encoding_are_400(client):
    check(post(client, '{"instances": [[1,2'), 400, "not valid JSON")
    # Audit finding: orjson's "surrogates not allowed: line 1 column 1 (char 0)" named neither the
    # byte nor where it was; the body's first byte that UTF-8 cannot start is named, with its offset.
    utf16 = b'{"instances": [[1,1,1,1,1,1]]}'.decode().encode("utf-16")
    check(post(client, utf16), 400, "not valid UTF-8, which JSON must be: byte 0xff at byte 0")
    latin = b'{"instances": [[1,1,1,1,1,1]], "method": "\xe9"}'
    response = post(client, latin)
    check(response, 400, f"byte 0xe9 at byte {latin.index(0xE9)} (invalid continuation byte)")
    assert response.json()["detail"] == {"byte": latin.index(0xE9)}  # a byte offset, not a character's
    large = b'{"instances": [' + b"[1,1,1,1,1,1]," * 10_000 + b'[1,1,1,1,1,1]], "ids": "\xff"}'
    check(post(client, large), 400, f"byte 0xff at byte {large.index(0xFF)}")


def test_limits_are_413(client):
    check(
        post(client, json.dumps({"instances": [ROW] * 501})), 413, "501 rows in one request; the limit is 500"
    )
    huge = json.dumps({"instances": [ROW] * 400}) + " " * 200_000
    check(post(client, huge), 413, "the limit is 200000")


def test_wrong_content_type_is_415(client):
    check(
        post(client, json.dumps({"instances": [ROW]}), "text/plain"), 415, "'text/plain'", "application/json"
    )
    check(client.post("/score", content=b"{}", headers={"content-type": ""}), 415, "no content type")
    # JSON is UTF-8: a body labelled in another charset would be misread, so it is refused.
    utf16 = json.dumps({"instances": [ROW]}).encode("utf-16")
    check(post(client, utf16, "application/json; charset=utf-16"), 415, "charset 'utf-16'", "UTF-8")
    ok = post(client, json.dumps({"instances": [ROW]}), 'application/json; charset="UTF-8"')
    assert ok.status_code == 200, ok.text
    # parameters read as RFC 2045 does: quoted strings whole, and a charset named twice is no answer
    row = json.dumps({"instances": [ROW]})
    check(post(client, row, 'application/json; charset="utf-8;x"'), 415, "charset")
    assert post(client, row, 'application/json; x="a;charset=latin-1"').status_code == 200
    check(post(client, row, "application/json; charset=utf-8; charset=latin-1"), 415, "charset")
    twice = [("content-type", "application/json"), ("content-type", "application/x-npy")]
    duplicated = client.post("/score", content=row.encode(), headers=twice)
    check(duplicated, 400, "Content-Type given more than once")


def test_unknown_route_and_method_keep_the_error_shape(client):
    check(client.get("/nope"), 404)
    check(client.get("/score"), 405)


def test_api_keys_guard_score_and_model_but_not_probes(tiny_bundle):
    client = ready_client(Settings(model_path=tiny_bundle, api_keys=["k1", "k2"], warmup_rows=4))
    try:
        body = json.dumps({"instances": [ROW]})
        check(post(client, body), 401, "missing or invalid API key")
        check(post(client, body, **{"X-API-Key": "k3"}), 401)
        assert post(client, body, **{"X-API-Key": "k2"}).status_code == 200
        assert post(client, body, Authorization="Bearer k1").status_code == 200
        check(client.get("/model"), 401)
        assert client.get("/model", headers={"x-api-key": "k1"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_keys_come_from_the_environment_as_a_comma_separated_list(monkeypatch):
    monkeypatch.setenv("ANOMALY_API_KEYS", " a ,b,, ")
    monkeypatch.setenv("ANOMALY_MAX_ROWS", "7")
    settings = Settings()
    assert settings.api_keys == ["a", "b"] and settings.max_rows == 7
    # A key travels in a header: one that is not printable ASCII would match only some clients'
    # encodings (an audit's 'kéy2' matched Latin-1 senders, not UTF-8 ones). Refused at start, and
    # the error names the setting but not the secret.
    for name, value in (("ANOMALY_API_KEYS", "a,kéy2"), ("ANOMALY_ADMIN_KEY", "two words")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match="printable ASCII") as refused:
            Settings()
        assert value not in str(refused.value) and name.removeprefix("ANOMALY_").lower() in str(refused.value)
        monkeypatch.delenv(name)


def test_a_model_that_fails_to_load_keeps_the_process_up_and_answers_503(tmp_path):
    from fastapi.testclient import TestClient

    from app.api.main import create_app

    with TestClient(create_app(Settings(model_path=tmp_path / "absent"))) as client:
        assert client.get("/healthz").status_code == 200
        for _ in range(100):
            body = client.get("/readyz").json()
            if body["detail"] is not None:
                break
        assert "no such directory" in body["detail"]
        response = post(client, json.dumps({"instances": [ROW]}))
        check(response, 503, "failed to load")
        assert response.headers["retry-after"] == "1"


def test_an_unhandled_error_is_a_500_that_keeps_the_request_id_and_is_counted(tiny_bundle, monkeypatch):
    """Starlette answers an unhandled exception from its outermost middleware, around the one that
    adds X-Request-ID: an audit's 500 came back without the id its log line carries."""
    from fastapi.testclient import TestClient

    from app.api import routes
    from app.api.main import create_app

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(routes, "check_query", broken)
    with TestClient(create_app(Settings(model_path=tiny_bundle)), raise_server_exceptions=False) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.05)
        response = client.post(
            "/score", json={"instances": [[0.0] * len(FEATURES)]}, headers={"X-Request-ID": "t-1"}
        )
        assert response.status_code == 500 and response.headers.get("x-request-id") == "t-1"
        assert response.json() == {"error": "internal error", "detail": "RuntimeError"}
        generated = client.post("/score", json={"instances": [[0.0] * len(FEATURES)]})
        assert len(generated.headers.get("x-request-id", "")) == 32
        assert 'anomaly_requests_total{code="500",endpoint="/score"} 2.0' in client.get("/metrics").text
