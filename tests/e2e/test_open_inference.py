"""The real Open Inference Protocol clients, tritonclient.http (binary tensors on and off) and KServe's
InferenceRESTClient (protocol v2, JSON and binary), against a real uvicorn serving the shipped model:
their answers equal /score's. The clients run in .venv-clients (scripts/setup_clients.sh, run by
scripts/test.sh), whose pins would move the project's own environment."""

import json
import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.bundle.format import load_bundle

from .test_hostile import serving

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / ".venv-clients" / "bin" / "python"
SHIPPED = ROOT / "models" / "default"
OUTPUTS = ("score", "is_anomaly", "p_value", "log_likelihood")

if not CLIENTS.exists():
    # CI runs scripts/test.sh, which creates it: there, a missing environment is a failure.
    if os.environ.get("CI"):
        raise RuntimeError(f"{CLIENTS} is missing: scripts/setup_clients.sh did not run")
    pytest.skip("the clients' environment is missing: run scripts/setup_clients.sh", allow_module_level=True)


def score(base: str, rows: np.ndarray, **options) -> dict:
    response = httpx.post(f"{base}/score", json={"instances": rows.tolist(), **options}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    return {"score": body["scores"], "is_anomaly": body["is_anomaly"], "p_value": body["p_values"]} | {
        "log_likelihood": body["log_likelihood"]
    }


def test_tritonclient_and_kserve_score_the_shipped_model_as_score_does(tmp_path):
    bundle = load_bundle(SHIPPED)
    scaler = bundle.scaler
    rng = np.random.default_rng(7)
    rows = scaler.mean + scaler.scale * rng.standard_normal((6, len(bundle.features)))
    rows[4:] += 6 * scaler.scale  # two far from the training data
    np.save(tmp_path / "rows.npy", rows)
    with serving(SHIPPED, tmp_path / "server.log") as server:
        address = server.base.removeprefix("http://")
        result = subprocess.run(
            [
                str(CLIENTS),
                str(ROOT / "tests/e2e/oip_clients.py"),
                address,
                bundle.name,
                str(tmp_path / "rows.npy"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        got = json.loads(result.stdout)
        as_fp64 = score(server.base, rows)
        as_fp32 = score(server.base, rows.astype(np.float32).astype(np.float64))  # tritonclient sends FP32
        latent = score(server.base, rows, method="latent", threshold="fpr_0.01")

    triton, kserve = got["triton"], got["kserve"]
    for client in (triton, kserve):
        assert client["live"] is True and client["ready"] is True and client["model_ready"] is True
    assert triton["metadata"]["name"] == bundle.name and triton["metadata"]["versions"] == [bundle.version]
    assert "binary_tensor_data" in triton["server"]["extensions"]
    assert (
        f"unknown model 'not-this-model'; this server serves '{bundle.name}'" in triton["unknown_model_error"]
    )
    answers = [(triton["binary_True"], as_fp32), (triton["binary_False"], as_fp32)]
    answers += [(kserve["binary_True"], as_fp64), (kserve["binary_False"], as_fp64)]
    answers += [(triton["defaults_latent"], latent)]
    for answer, expected in answers:
        for name in OUTPUTS:  # exactly equal: the same scorer, float64 on the wire both ways
            assert answer["outputs"][name] == expected[name], name
    assert triton["binary_True"]["id"] == "req-1" and kserve["binary_False"]["id"] == "req-2"
    assert triton["defaults_latent"]["parameters"]["method"] == "latent"
    assert triton["defaults_latent"]["parameters"]["threshold"] == "fpr_0.01"
    assert any(triton["binary_True"]["outputs"]["is_anomaly"]) and not all(as_fp64["is_anomaly"])
