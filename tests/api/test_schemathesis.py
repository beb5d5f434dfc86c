"""Schemathesis against the service's own OpenAPI schema: no 5xx anywhere, every response as documented.

Every operation in the schema gets generated requests, valid and invalid (schemathesis' positive
and negative modes), sent in-process to the ASGI app once it is ready. Two checks run on each
response:

- ``not_a_server_error``: no 5xx. The service's own 503s (model loading, overload, timeout) are
  documented but must not happen here: the model is loaded before the first case, and one
  sequential client is far from the queue limit (64) and the time limit (30 s).
- ``response_schema_conformance``: the body matches the schema documented for its status code.
  Today only /score's 200 and the ``{"error", "detail"}`` bodies have a schema; the other routes'
  200s are documented as any JSON (``{}``), so there the check only means "valid JSON".

CI runs 25 examples per operation (about 20 s here). The longer run:

    SCHEMATHESIS_EXAMPLES=500 .venv/bin/python -m pytest tests/api/test_schemathesis.py

The admin route is included and sent the admin key, so its generated bodies reach the reload code
(path resolution inside the model root, bundle loading, refusal); the model root holds one copy
of the tiny bundle and nothing else.

The schema is built at import time from `create_app(...).openapi()`, which needs no model (the
model loads in the lifespan), because schemathesis' lazy `from_fixture` loader does not work with
this pytest (it sets `Function._nodeid`, gone in pytest 9). Once a model is served, GET /openapi.json
carries examples built from it (app.api.docs); `test_the_tested_schema_is_the_served_one` proves the
schema is otherwise exactly what it serves: every path, operation, parameter and response schema.
"""

import os
import shutil
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance

from app.api.main import create_app
from app.api.settings import Settings

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))
ADMIN_KEY = "schemathesis-admin"
CHECKS = [not_a_server_error, response_schema_conformance]
# No model is loaded for this app: its lifespan never runs; only the schema is read.
OPENAPI = create_app(Settings(model_path="unused")).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)
# /score also takes a .npy file: generated binary bodies are sent as they are.
schemathesis.serializer.alias("application/x-npy", "application/octet-stream")


@pytest.fixture(scope="module")
def model_root(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("schemathesis-models")
    shutil.copytree(tiny_bundle, root / "current")
    return root


@pytest.fixture()
def client(model_root):
    """A requests session into a fresh ASGI app, once its /readyz says 200.

    One app per test: schemathesis' pytest plugin ends every ASGI lifespan after each test, and a
    session used again would start the same app's lifespan (and model load) a second time.
    """
    app = create_app(Settings(model_path=model_root / "current", warmup_rows=4, admin_key=ADMIN_KEY))
    with asgi.get_client(app) as session:  # starts the app's lifespan, hence the model load
        deadline = time.monotonic() + 60
        while session.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.05)
        yield session
    asgi.shutdown_lifespans()  # the app's shutdown (drain), if the plugin has not run it yet


def without_examples(document):
    """The document less its examples: the one part that depends on the served model."""
    if isinstance(document, dict):
        return {k: without_examples(v) for k, v in document.items() if k not in ("example", "examples")}
    if isinstance(document, list):
        return [without_examples(v) for v in document]
    return document


def test_the_tested_schema_is_the_served_one(client):
    served = client.get("/openapi.json").json()
    assert without_examples(served) == without_examples(OPENAPI)
    assert served != OPENAPI  # the served model's examples, not the stand-ins the tested schema has
    assert {f"{m.upper()} {p}" for p, ops in OPENAPI["paths"].items() for m in ops} == {
        "POST /score",
        "POST /admin/reload",
        "GET /model",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /v2",
        "GET /v2/health/live",
        "GET /v2/health/ready",
        "GET /v2/models/{name}",
        "GET /v2/models/{name}/versions/{version}",
        "GET /v2/models/{name}/ready",
        "GET /v2/models/{name}/versions/{version}/ready",
        "POST /v2/models/{name}/infer",
        "POST /v2/models/{name}/versions/{version}/infer",
    }


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # one app per operation, shared by its examples on purpose
    ],
)
def test_no_server_errors_and_every_response_as_documented(case, client):
    case.call_and_validate(
        base_url="http://testserver", session=client, headers={"X-Admin-Key": ADMIN_KEY}, checks=CHECKS
    )


# Found by this file: the 422 handler once echoed each error's 'input' through orjson, which fails on
# raw bytes and on integers beyond 64 bits (a 500); and a NUL byte in a reload path escaped as a 500.
@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("text/plain", b'{"path": null}', 415),
        ("multipart/form-data", b'{"path": null}', 415),
        ("application/json", b'{"path": 18446744073709551616}', 422),
        ("application/json", b"-9223372036854775809", 422),
        ("application/json", b'{"path": "\\ud800"}', 400),  # no UTF-8 text holds it, as on /score
        ("application/json", b'{"path": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
        ("application/json", b'{"path": "\xff"}', 400),
    ],
)
def test_reload_validation_errors_are_4xx_not_500(client, content_type, body, status):
    response = client.post(
        "/admin/reload", data=body, headers={"Content-Type": content_type, "X-Admin-Key": ADMIN_KEY}
    )
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "detail"}


def test_a_reload_path_with_a_nul_byte_is_422_not_500(client):
    response = client.post("/admin/reload", json={"path": "a\x00b"}, headers={"X-Admin-Key": ADMIN_KEY})
    assert response.status_code == 422
    assert set(response.json()) == {"error", "detail"}
