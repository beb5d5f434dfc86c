"""/docs and /redoc without internet access (assets served by the service itself), and an OpenAPI
document whose examples are the served model's: posted as they are, they answer 200."""

import re

import pytest
from fastapi.testclient import TestClient

from app.api.docs import ASSETS
from app.api.main import create_app
from app.api.parsing import OPTIONS
from app.api.settings import Settings
from app.bundle.format import load_bundle

from ..conftest import FEATURES

# Every URL a page loads: script and link tags, and the document Swagger UI or ReDoc fetches.
LOADED = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)["']|url: *'([^']+)'""")
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_only_what_the_service_serves(client, page):
    response = client.get(page)
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    html = response.text
    # No CDN and no web fonts: nothing on the page names another host.
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.IGNORECASE), html
    urls = {a or b for a, b in LOADED.findall(html)}
    assert "/openapi.json" in urls
    assets = urls - {"/openapi.json"}
    assert assets and all(url.startswith(f"{ASSETS}/") for url in assets), urls
    for url in assets:
        served = client.get(url)
        assert served.status_code == 200, url
        assert len(served.content) > 100, url
        expected = CONTENT_TYPES[url[url.rindex(".") :]]
        assert expected in served.headers["content-type"], (url, served.headers["content-type"])


def test_behind_a_path_prefix_the_pages_ask_for_prefixed_urls():
    # No lifespan (no `with`): the pages need no model.
    prefixed = TestClient(create_app(Settings(model_path="unused")), root_path="/anomaly")
    swagger, redoc = prefixed.get("/docs").text, prefixed.get("/redoc").text
    assert f'src="/anomaly{ASSETS}/swagger-ui-bundle.js"' in swagger and "'/anomaly/openapi.json'" in swagger
    assert f'src="/anomaly{ASSETS}/redoc.standalone.js"' in redoc and '"/anomaly/openapi.json"' in redoc


def test_every_operation_has_a_tag_a_summary_and_a_description(client):
    spec = client.get("/openapi.json").json()
    declared = {tag["name"] for tag in spec["tags"]}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            assert operation.get("tags") and set(operation["tags"]) <= declared, where
            assert operation.get("summary") and operation.get("description"), where


def test_the_score_examples_are_the_served_models_and_answer_200(client, tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    operation = client.get("/openapi.json").json()["paths"]["/score"]["post"]
    examples = operation["requestBody"]["content"]["application/json"]["examples"]
    assert set(examples) == {"rows", "named"}
    for name, example in examples.items():
        body = example["value"]
        first = body["instances"][0]
        assert (list(first) if isinstance(first, dict) else len(first)) in (bundle.features, len(FEATURES))
        response = client.post("/score", json=body)  # exactly what Swagger's "Try it out" sends
        assert response.status_code == 200, (name, response.text)
        assert response.json()["model"] == {"name": bundle.name, "version": bundle.version}
    # The far row of the "rows" example is one: the example shows both answers.
    assert client.post("/score", json=examples["rows"]["value"]).json()["is_anomaly"] == [False, True]


def test_the_npy_options_are_declared_as_query_parameters(client):
    operation = client.get("/openapi.json").json()["paths"]["/score"]["post"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert set(parameters) == set(OPTIONS)
    for parameter in parameters.values():
        assert parameter["in"] == "query" and not parameter["required"]
        assert "application/x-npy" in parameter["description"]
    assert parameters["components"]["schema"]["type"] == "boolean"
    # As documented: with a JSON body they are refused.
    refused = client.post("/score", params={"explain": "true"}, json={"instances": [[1.0] * 6]})
    assert refused.status_code == 422


def test_the_error_examples_are_the_services_documents(client, tiny_bundle):
    features = load_bundle(tiny_bundle).features
    responses = client.get("/openapi.json").json()["paths"]["/score"]["post"]["responses"]
    for status in ("400", "401", "408", "413", "415", "422", "503"):
        examples = responses[status]["content"]["application/json"]["examples"]
        assert examples, status
        for example in examples.values():
            assert set(example["value"]) == {"error", "detail"} and example["value"]["error"], status
    cell = responses["422"]["content"]["application/json"]["examples"]["cell"]["value"]
    assert cell["detail"] == {"row": 0, "column": features[1]}
    # The example is the answer, word for word.
    wrong = client.post("/score", json={"instances": [[1.0, "n/a", *[1.0] * (len(features) - 2)]]})
    assert wrong.json() == cell
    assert "Retry-After" in responses["503"]["headers"]
    limits = responses["413"]["content"]["application/json"]["examples"]
    assert limits["bytes"]["value"]["detail"] == {"limit": 200_000}  # the client fixture's max_body_bytes


def test_the_v2_infer_example_answers_200(client):
    operation = client.get("/openapi.json").json()["paths"]["/v2/models/{name}/infer"]["post"]
    name = next(p["example"] for p in operation["parameters"] if p["name"] == "name")
    body = operation["requestBody"]["content"]["application/json"]["example"]
    response = client.post(f"/v2/models/{name}/infer", json=body)
    assert response.status_code == 200, response.text


def first_row_width(spec: dict) -> int:
    examples = spec["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    return len(examples["rows"]["value"]["instances"][0])


def test_the_document_is_rebuilt_once_the_model_is_served_not_cached_before(tiny_bundle):
    app = create_app(Settings(model_path=tiny_bundle, warmup_rows=4))
    before = app.openapi()
    assert app.openapi() is before  # cached while the served model does not change
    assert first_row_width(before) == 3  # the static stand-in of app.api.schemas
    app.state.service.host.load()  # what the lifespan's thread does
    after = app.openapi()
    assert first_row_width(after) == len(load_bundle(tiny_bundle).features)
    assert app.openapi() is after
    # Filling in the served examples left the static ones as they were.
    assert first_row_width(create_app(Settings(model_path="unused")).openapi()) == 3
