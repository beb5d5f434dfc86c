"""Model roll-out without downtime: admin reload, refusal of a broken bundle, reload under load."""

import shutil
import threading

import pytest

from app.api.settings import Settings
from app.bundle.format import WEIGHTS, load_bundle
from app.train.options import Candidate, FitOptions
from app.train.pipeline import TrainRequest, train_bundle

from ..conftest import FEATURES, manifold_rows
from .conftest import ready_client
from .test_errors import check
from .test_metrics import scrape, value

ADMIN = {"X-Admin-Key": "secret-admin"}


@pytest.fixture(scope="module")
def root(tiny_bundle, tmp_path_factory):
    """A model root with two good bundles and a corrupt one."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_bundle, root / "a")
    request = TrainRequest(
        [Candidate(latent_dim=2, hidden=8, components=2)], FitOptions(steps=60, seed=3), name="b"
    )
    train_bundle(manifold_rows(400, seed=9), FEATURES, request, root / "b")
    shutil.copytree(root / "b", root / "corrupt")
    weights = bytearray((root / "corrupt" / WEIGHTS).read_bytes())
    weights[-5] ^= 0xFF
    (root / "corrupt" / WEIGHTS).write_bytes(bytes(weights))
    return root


@pytest.fixture()
def client(root):
    c = ready_client(Settings(model_path=root / "a", admin_key="secret-admin", warmup_rows=4))
    yield c
    c.__exit__(None, None, None)


def version(client) -> str:
    return client.get("/readyz").json()["model"]["version"]


def test_admin_routes_need_the_admin_key_and_are_off_without_one(root, client):
    check(client.post("/admin/reload"), 401, "admin key")
    check(client.post("/admin/reload", headers={"X-Admin-Key": "wrong"}), 401)
    check(client.post("/admin/reload", headers={"X-API-Key": "secret-admin"}), 401)  # scoring keys don't do
    closed = ready_client(Settings(model_path=root / "a", warmup_rows=4))
    try:
        check(closed.post("/admin/reload", headers=ADMIN), 403, "admin routes are disabled")
    finally:
        closed.__exit__(None, None, None)


def test_reload_swaps_the_model_and_refuses_a_corrupt_one(root, client):
    a, b = load_bundle(root / "a").version, load_bundle(root / "b").version
    assert version(client) == a
    response = client.post("/admin/reload", json={"path": "b"}, headers=ADMIN)
    assert response.status_code == 200 and response.json()["model"]["version"] == b
    assert response.json()["previous_version"] == a
    scored = client.post("/score", json={"instances": manifold_rows(2, seed=1).tolist()}).json()
    assert scored["model"]["version"] == b
    body = check(client.post("/admin/reload", json={"path": "corrupt"}, headers=ADMIN), 422, "refused")
    assert "SHA-256" in body["detail"]["error"]
    assert version(client) == b  # the previous model keeps serving
    check(
        client.post("/admin/reload", json={"path": "../elsewhere"}, headers=ADMIN),
        422,
        "outside the model root",
    )
    # A bundle inside the root whose files link out of it (issue 15): refused before loading.
    elsewhere = root.parent / f"{root.name}-elsewhere"
    shutil.copytree(root / "a", elsewhere)  # a good bundle, outside the root
    (root / "outside-a").mkdir()
    for entry in elsewhere.iterdir():
        (root / "outside-a" / entry.name).symlink_to(entry)
    check(
        client.post("/admin/reload", json={"path": "outside-a"}, headers=ADMIN),
        422,
        "links outside the model root",
    )
    assert version(client) == b
    # The hostile-client audit's 500s and silent acceptances: a name beyond the file system's limit
    # (raised by is_dir, not by resolve), a misspelt field, a field given twice.
    check(client.post("/admin/reload", json={"path": "a" * 5000}, headers=ADMIN), 422, "not a usable path")
    check(client.post("/admin/reload", json={"paht": "a"}, headers=ADMIN), 422, "paht")
    # Audit finding: the path given as a query parameter was ignored, and the current model reloaded
    response = client.post("/admin/reload?path=a", headers=ADMIN)
    check(response, 422, "unknown query parameters (JSON options go in the body) ['path']")
    duplicated = b'{"path": "a", "path": "b"}'
    response = client.post(
        "/admin/reload", content=duplicated, headers=ADMIN | {"content-type": "application/json"}
    )
    check(response, 422, "duplicate key 'path'")
    # json.loads of bytes reads UTF-16 and UTF-32 too: an audit's UTF-16 body reloaded the model
    json_type = ADMIN | {"content-type": "application/json"}
    for body in ('{"path": "a"}'.encode("utf-16"), b'{"path": "\\ud800"}', b'\xef\xbb\xbf{"path": "a"}'):
        check(client.post("/admin/reload", content=body, headers=json_type), 400, "not valid UTF-8 JSON")
    assert version(client) == b
    samples = scrape(client)
    assert value(samples, "anomaly_reloads_total", result="success") == 1
    assert value(samples, "anomaly_reloads_total", result="failure") == 1
    assert value(samples, "anomaly_model_info", name="b", version=b) == 1
    assert value(samples, "anomaly_model_info", name="tiny", version=a) == 0


def test_reload_under_load_loses_no_request(root, client):
    versions = {load_bundle(root / n).version for n in ("a", "b")}
    rows = manifold_rows(20, seed=2).tolist()
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def keep_scoring() -> None:
        while not stop.is_set() and len(results) < 2000:
            response = client.post("/score", json={"instances": rows})
            results.append((response.status_code, response.json().get("model", {}).get("version", "")))

    worker = threading.Thread(target=keep_scoring)
    worker.start()
    try:
        for target in ("b", "a", "corrupt", "b", "a"):
            status = client.post("/admin/reload", json={"path": target}, headers=ADMIN).status_code
            assert status == (422 if target == "corrupt" else 200)
        assert version(client) == load_bundle(root / "a").version
    finally:
        stop.set()
        worker.join()
    assert len(results) > 0
    assert all(code == 200 for code, _ in results), {code for code, _ in results}
    assert {v for _, v in results} <= versions
