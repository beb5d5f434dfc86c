"""The Docker image's CPU runtime, built without Docker by the very install script the Dockerfile runs
(scripts/build_cpu_runtime.sh -> scripts/install_runtime.sh cpu), serves and scores a model.

About a minute of pip on the 2-core machine, so marked slow; it runs in CI all the same.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from ..conftest import manifold_rows
from ..e2e.test_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def start(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, base: str, timeout: float = 90) -> bool:
    """True once /readyz answers 200; False if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    process.wait()
    pytest.fail(f"{process.args[0]} did not become ready within {timeout} s")


def stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail("the server did not stop within 30 s of SIGTERM")
    return process.returncode


def assert_scores(base: str) -> None:
    response = httpx.post(f"{base}/score", json={"instances": manifold_rows(3, seed=91).tolist()}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["scores"]) == 3 and body["model"]["name"] == "tiny"


@pytest.mark.slow
def test_the_cpu_runtime_built_like_the_image_serves_the_model(tiny_bundle, tmp_path):
    venv = tmp_path / "runtime"
    started = time.monotonic()
    build = subprocess.run(
        ["bash", str(ROOT / "scripts/build_cpu_runtime.sh"), str(venv)],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    (tmp_path / "build.log").write_text(build.stderr)
    assert build.returncode == 0, build.stderr[-5000:]
    assert build.stdout.strip().splitlines()[-1] == str(venv)
    print(f"runtime venv built in {time.monotonic() - started:.0f} s")

    # Outside the repository and without its paths, so only the venv's own install can be imported.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}} | {
        "ANOMALY_MODEL_PATH": str(tiny_bundle),
        "ANOMALY_WARMUP_ROWS": "8",
    }
    probe = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import app.api.main as m, json, importlib.util as u; "
            "print(json.dumps({'app': m.__file__, "
            "'absent': [n for n in ('torch', 'pandas', 'sklearn', 'tqdm') if u.find_spec(n) is None]}))",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    installed = json.loads(probe.stdout)
    assert installed["app"].startswith(str(venv / "lib")), "the package must come from the venv's wheel"
    # the CPU image scores every method, projected included, through onnxruntime: no PyTorch at all
    assert installed["absent"] == ["torch", "pandas", "sklearn", "tqdm"], "training extras in .[serve]"

    # The app factory under the venv's uvicorn.
    process, base = start(
        [str(venv / "bin/uvicorn"), "app.api.main:create_app", "--factory", "--no-access-log"],
        env,
        tmp_path,
        tmp_path / "uvicorn.log",
    )
    try:
        assert wait_ready(process, base), (tmp_path / "uvicorn.log").read_text()[-3000:]
        assert_scores(base)
    finally:
        stop(process)

    # The image's entrypoint: anomaly-scores serve.
    log = tmp_path / "serve.log"
    process, base = start([str(venv / "bin/anomaly-scores"), "serve"], env, tmp_path, log)
    try:
        if not wait_ready(process, base):
            pytest.fail(f"anomaly-scores serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        assert_scores(base)
    finally:
        code = stop(process)
    assert code == 0, log.read_text()[-3000:]
