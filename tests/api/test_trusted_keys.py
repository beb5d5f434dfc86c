"""ANOMALY_TRUSTED_KEYS: the service loads and reloads only bundles signed by a trusted key."""

import shutil

from app.api.settings import Settings
from app.bundle.format import load_bundle
from app.bundle.signing import generate_keypair, sign_bundle

from .conftest import ready_client
from .test_errors import check

ADMIN = {"X-Admin-Key": "admin"}


def test_only_bundles_signed_by_a_trusted_key_are_loaded(tiny_bundle, tmp_path):
    root = tmp_path / "models"
    for name in ("signed", "unsigned", "foreign", "tampered"):
        shutil.copytree(tiny_bundle, root / name)
    keys = tmp_path / "keys"
    keys.mkdir()
    generate_keypair(keys / "ours.pem", keys / "ours.pub")
    generate_keypair(keys / "theirs.pem", keys / "theirs.pub")
    for name in ("signed", "tampered"):
        sign_bundle(root / name, keys / "ours.pem")
    sign_bundle(root / "foreign", keys / "theirs.pem")
    manifest = (root / "tampered" / "bundle.json").read_bytes()
    (root / "tampered" / "bundle.json").write_bytes(manifest.replace(b'"name": "tiny"', b'"name": "tinY"'))

    settings = Settings(
        model_path=root / "unsigned", trusted_keys=[keys / "ours.pub"], admin_key="admin", warmup_rows=4
    )
    unready = ready_client_or_none(settings)
    body = check(unready.get("/readyz"), 503, "failed to load")
    assert "unsigned" in body["detail"]
    unready.__exit__(None, None, None)

    client = ready_client(settings.model_copy(update={"model_path": root / "signed"}))
    try:
        version = client.get("/readyz").json()["model"]["version"]
        assert version == load_bundle(root / "signed").version
        for name, fragment in (("unsigned", "unsigned"), ("foreign", "not trusted"), ("tampered", "")):
            body = check(client.post("/admin/reload", json={"path": name}, headers=ADMIN), 422, "refused")
            assert "SignatureError" in body["detail"]["error"] and fragment in body["detail"]["error"]
            assert client.get("/readyz").json()["model"]["version"] == version
        assert client.post("/admin/reload", json={"path": "signed"}, headers=ADMIN).status_code == 200
    finally:
        client.__exit__(None, None, None)


def ready_client_or_none(settings: Settings):  # type: ignore[no-untyped-def]
    """A client of a service whose load is expected to fail: wait until it has failed."""
    import time

    from fastapi.testclient import TestClient

    from app.api.main import create_app

    client = TestClient(create_app(settings))
    client.__enter__()
    deadline = time.monotonic() + 60
    while "still loading" in client.get("/readyz").text and time.monotonic() < deadline:
        time.sleep(0.05)
    return client
