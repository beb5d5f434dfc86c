import time

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.api.settings import Settings


def ready_client(settings: Settings) -> TestClient:
    client = TestClient(create_app(settings))
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("the service did not become ready")
        time.sleep(0.05)
    return client


@pytest.fixture(scope="module")
def client(tiny_bundle):
    c = ready_client(Settings(model_path=tiny_bundle, max_rows=500, max_body_bytes=200_000, warmup_rows=8))
    yield c
    c.__exit__(None, None, None)
