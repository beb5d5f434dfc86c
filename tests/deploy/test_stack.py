"""The compose stack's own configs, run for real on loopback: two scorer replicas, nginx, Prometheus.

nginx runs deploy/nginx/nginx.conf and Prometheus deploy/prometheus/prometheus.yml (with alerts.yml),
rewritten only for ports, upstream addresses, file paths and the scrape interval.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import manifold_rows
from ..e2e.test_server import Server, free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy/nginx/nginx.conf"
PROMETHEUS_DIR = ROOT / "deploy/prometheus"
DASHBOARD = ROOT / "deploy/grafana/dashboards/anomaly-scores.json"
REPLICAS = ("scorer-1", "scorer-2")


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and Path(f"/usr/sbin/{name}").exists():
        found = f"/usr/sbin/{name}"
    return found


NGINX = _binary("nginx")
PROMETHEUS = _binary("prometheus")
pytestmark = pytest.mark.skipif(
    NGINX is None or PROMETHEUS is None,
    reason="needs the nginx and prometheus binaries (Debian packages nginx-light and prometheus; "
    "scripts/system-deps.sh installs them)",
)

BODY = {"instances": manifold_rows(4, seed=71).tolist()}


def wait_for(what: str, check: Callable[[], Any], timeout: float, process: subprocess.Popen | None = None):
    """Polls `check` until it returns something truthy; fails after `timeout` s or if `process` died."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.TransportError, OSError) as e:
            last = e  # not up yet: keep polling
        else:
            if last:
                return last
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode}")
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout} s (last: {last!r})")


def nginx_config(text: str, listen: int, upstreams: dict[str, str], prefix: Path) -> str:
    """The shipped config with only its ports, upstream addresses and file paths moved."""
    for name, address in upstreams.items():
        text, n = re.subn(rf"\bserver {re.escape(name)}:8000\b", f"server {address}", text)
        assert n == 1, f"upstream {name}:8000 not found once in {NGINX_CONF}"
    text, n = re.subn(r"\blisten 8080;", f"listen 127.0.0.1:{listen};", text)
    assert n == 1, "listen 8080; not found once"
    text = text.replace("/tmp/", f"{prefix}/")  # pid and temporary files
    return text.replace("/dev/stdout", f"{prefix}/access.log")


def prometheus_config(text: str, targets: dict[str, str], self_address: str) -> str:
    """The shipped config with only its targets and intervals changed (15 s -> 1 s)."""
    for name, address in targets.items():
        text, n = re.subn(rf'"{re.escape(name)}:8000"', f'"{address}"', text)
        assert n == 1, f"target {name}:8000 not found once"
    text = text.replace('"localhost:9090"', f'"{self_address}"')
    for key in ("scrape_interval", "evaluation_interval"):
        text, n = re.subn(rf"\b{key}: 15s", f"{key}: 1s", text)
        assert n == 1, f"{key}: 15s not found once"
    return text


def score_requests(server_base: str) -> float:
    """The replica's own count of answered POST /score requests."""
    text = httpx.get(f"{server_base}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "anomaly_requests_total" and sample.labels.get("endpoint") == "/score"
    )


def start_nginx(upstreams: dict[str, str], prefix: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """nginx with the shipped config, its scorer-N upstreams at the given addresses."""
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(NGINX_CONF.read_text(), port, upstreams, prefix))
    with log.open("w") as out:
        process = subprocess.Popen(
            [NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            "nginx answers /nginx-health",
            lambda: httpx.get(f"{base}/nginx-health", timeout=2).status_code == 200,
            15,
            process,
        )
    except BaseException:
        _stop(process)
        raise
    return process, base


def new_prefix() -> Path:
    # nginx's worker processes drop root for nobody: their directory must be reachable by them,
    # which pytest's 0700 temporary tree is not.
    prefix = Path(tempfile.mkdtemp(prefix="anomaly-nginx-"))
    prefix.chmod(0o755)
    return prefix


@dataclass
class Stack:
    replicas: dict[str, Server]
    lb: str
    prometheus: str
    nginx: subprocess.Popen
    prometheus_process: subprocess.Popen
    logs: Path

    def address(self, replica: str) -> str:
        return self.replicas[replica].base.removeprefix("http://")

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=5)
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def stack(tiny_bundle, tmp_path_factory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("stack")
    prefix = new_prefix()
    processes: list[subprocess.Popen] = []
    replicas: dict[str, Server] = {}
    try:
        with ThreadPoolExecutor(len(REPLICAS)) as pool:  # start_server gives up after 90 s
            futures = {
                # as docker-compose.yml: nginx does not poll readiness, so no drain on SIGTERM
                name: pool.submit(
                    start_server, tiny_bundle, logs / f"{name}.log", "serve", {"ANOMALY_DRAIN_S": "0"}
                )
                for name in REPLICAS
            }
        for name, future in futures.items():  # all done: keep every started one, for the cleanup
            if future.exception() is None:
                replicas[name] = future.result()
                processes.append(replicas[name].process)
        for future in futures.values():
            if future.exception() is not None:
                raise future.exception()

        nginx, lb = start_nginx(
            {name: server.base.removeprefix("http://") for name, server in replicas.items()},
            prefix,
            logs / "nginx.log",
        )
        processes.append(nginx)

        prom_dir = logs / "prometheus"
        prom_dir.mkdir()
        prom_port = free_port()
        (prom_dir / "prometheus.yml").write_text(
            prometheus_config(
                (PROMETHEUS_DIR / "prometheus.yml").read_text(),
                {name: server.base.removeprefix("http://") for name, server in replicas.items()},
                f"127.0.0.1:{prom_port}",
            )
        )
        shutil.copy(PROMETHEUS_DIR / "alerts.yml", prom_dir / "alerts.yml")  # rule_files is relative
        with (logs / "prometheus.log").open("w") as out:
            prometheus = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={prom_dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={prom_dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        processes.append(prometheus)
        prom = f"http://127.0.0.1:{prom_port}"
        wait_for(
            "Prometheus is ready",
            lambda: httpx.get(f"{prom}/-/ready", timeout=2).status_code == 200,
            30,
            prometheus,
        )
        yield Stack(replicas, lb, prom, nginx, prometheus, logs)
    finally:
        for process in reversed(processes):
            _stop(process, signal.SIGQUIT if process.args[0] == NGINX else signal.SIGTERM)
        shutil.rmtree(prefix, ignore_errors=True)


def test_nginx_balances_over_both_replicas_and_passes_the_request_id(stack):
    before = {name: score_requests(server.base) for name, server in stack.replicas.items()}
    upstreams = set()
    with httpx.Client(base_url=stack.lb, timeout=10) as client:
        for i in range(20):
            response = client.post("/score", json=BODY, headers={"X-Request-ID": f"stack-test-{i}"})
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] == f"stack-test-{i}"  # forwarded and echoed
            assert len(response.json()["scores"]) == 4
            upstreams.add(response.headers["x-upstream"])
    assert upstreams == {stack.address(name) for name in REPLICAS}
    served = {name: score_requests(server.base) - before[name] for name, server in stack.replicas.items()}
    assert sum(served.values()) == 20, served
    assert min(served.values()) >= 5, f"round robin should share 20 requests about evenly: {served}"
    log = (stack.logs / "scorer-1.log").read_text() + (stack.logs / "scorer-2.log").read_text()
    assert '"request_id": "stack-test-0"' in log


def test_nginx_limits_bodies_and_reports_its_own_health(stack):
    assert httpx.get(f"{stack.lb}/nginx-health", timeout=5).text == "ok\n"
    assert "Active connections" in httpx.get(f"{stack.lb}/nginx-status", timeout=5).text
    # A 17 MiB body is refused by nginx on its Content-Length alone, before any byte of it is sent.
    port = int(stack.lb.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"POST /score HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\n"
            b"Content-Length: 17825792\r\nConnection: close\r\n\r\n"
        )
        status_line = s.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"413", status_line


def test_the_image_healthcheck_command_passes_on_a_ready_replica_only(stack):
    dockerfile = (ROOT / "Dockerfile").read_text()
    match = re.search(r"^HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert match, "no exec-form HEALTHCHECK in the Dockerfile"
    program, flag, code = json.loads(match.group(1))
    assert (program, flag) == ("python", "-c") and "127.0.0.1:8000/readyz" in code
    ready = code.replace("127.0.0.1:8000", stack.address("scorer-2"))
    nothing = code.replace("127.0.0.1:8000", f"127.0.0.1:{free_port()}")
    assert subprocess.run([sys.executable, "-c", ready], timeout=20, check=False).returncode == 0
    assert (
        subprocess.run(
            [sys.executable, "-c", nothing], timeout=20, check=False, capture_output=True
        ).returncode
        != 0
    )


def test_prometheus_scrapes_every_replica_and_evaluates_the_alerts_and_dashboard(stack):
    with httpx.Client(base_url=stack.lb, timeout=10) as client:
        for _ in range(6):
            assert client.post("/score", json=BODY).status_code == 200

    def targets_up():
        data = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=5).json()["data"]
        ours = [t for t in data["activeTargets"] if t["labels"]["job"] == "anomaly-scores"]
        return ours if len(ours) == 2 and all(t["health"] == "up" for t in ours) else None

    targets = wait_for("both replicas up in Prometheus", targets_up, 30)
    assert {t["labels"]["instance"] for t in targets} == {stack.address(n) for n in REPLICAS}
    assert {t["labels"]["replica"] for t in targets} == set(REPLICAS)

    version = httpx.get(f"{stack.replicas['scorer-1'].base}/model", timeout=5).json()["version"]
    info = wait_for("anomaly_model_info of both replicas", lambda: stack.query("anomaly_model_info"), 15)
    assert sorted(r["metric"]["instance"] for r in info) == sorted(stack.address(n) for n in REPLICAS)
    assert {r["metric"]["version"] for r in info} == {version}

    def rules_evaluated():
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule["health"] == "ok" for rule in rules) else None

    rules = wait_for("every alerting rule evaluated without error", rules_evaluated, 15)
    assert {rule["name"] for rule in rules} >= {
        "ReplicaDown",
        "HighErrorRate",
        "HighLatencyP99",
        "FlaggedRateFarAboveCalibrated",
    }

    # Every query of the Grafana dashboard runs on the real series, and all but the error ratios
    # (no error was served) return data.
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10

    def concrete(expr: str) -> str:
        return (
            expr.replace("$__rate_interval", "1m").replace("$drift_window", "1m").replace("$instance", ".*")
        )

    def dashboard_has_data():
        empty = [e for e in exprs if 'code=~"' not in e and not stack.query(concrete(e))]
        return not empty or None

    wait_for("every dashboard query returns data", dashboard_has_data, 20)
    for expr in exprs:
        stack.query(concrete(expr))  # asserts status success: no PromQL or matching error


def test_requests_a_replica_answers_503_are_retried_on_the_other(stack, tmp_path):
    """A replica whose model failed to load is alive but answers 503: nginx (http_503, non_idempotent)
    sends those POSTs on to the healthy replica, and the client never sees the 503."""
    port = free_port()
    env = os.environ | {"ANOMALY_MODEL_PATH": str(tmp_path / "no-such-bundle")}
    with (tmp_path / "broken.log").open("w") as out:
        broken = subprocess.Popen(
            [
                sys.executable,
                *("-m", "uvicorn", "app.api.main:create_app", "--factory", "--no-access-log"),
                *("--host", "127.0.0.1", "--port", str(port)),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    broken_address = f"127.0.0.1:{port}"
    prefix = new_prefix()
    nginx = None
    try:
        wait_for(
            "the broken replica answers /readyz with 503",
            lambda: httpx.get(f"http://{broken_address}/readyz", timeout=2).status_code == 503,
            60,
            broken,
        )
        nginx, lb = start_nginx(
            {"scorer-1": broken_address, "scorer-2": stack.address("scorer-2")},
            prefix,
            tmp_path / "nginx.log",
        )
        upstreams = []
        with httpx.Client(base_url=lb, timeout=10) as client:
            for _ in range(10):
                response = client.post("/score", json=BODY)
                assert response.status_code == 200, response.text
                upstreams.append(response.headers["x-upstream"])
        assert f"{broken_address}, {stack.address('scorer-2')}" in upstreams, upstreams
        assert all(u.endswith(stack.address("scorer-2")) for u in upstreams)
    finally:
        if nginx is not None:
            _stop(nginx, signal.SIGQUIT)
        _stop(broken)
        shutil.rmtree(prefix, ignore_errors=True)


def test_a_replica_stopped_mid_traffic_loses_no_request(stack):
    """SIGTERM to one replica while 4 clients send 200 requests through nginx: every request ends 200,
    with at most one client-side retry, and the replica exits 0 after finishing what it had."""
    victim, survivor = stack.replicas["scorer-1"], stack.replicas["scorer-2"]
    outcomes: list[tuple[int, int, str, float]] = []  # status, attempts, upstream, finished at
    lock = threading.Lock()
    stopped_at: list[float] = []

    def client(n: int) -> None:
        with httpx.Client(base_url=stack.lb, timeout=15) as http:
            for _ in range(n):
                status, upstream, attempts = 0, "", 0
                while attempts < 2 and status != 200:  # at most one retry by the client
                    attempts += 1
                    try:
                        response = http.post("/score", json=BODY)
                        status, upstream = response.status_code, response.headers.get("x-upstream", "")
                    except httpx.TransportError:
                        status = -1
                with lock:
                    outcomes.append((status, attempts, upstream, time.monotonic()))
                    if len(outcomes) == 60:
                        stopped_at.append(time.monotonic())
                        victim.process.send_signal(signal.SIGTERM)
                time.sleep(0.03)  # ~100 requests/s in all: traffic goes on well past the stop

    threads = [threading.Thread(target=client, args=(50,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "clients did not finish within 120 s"

    assert stopped_at, "the replica was never stopped"
    assert victim.process.wait(timeout=30) == 0  # graceful: requests in flight finished, exit 0
    assert len(outcomes) == 200
    failed = [o for o in outcomes if o[0] != 200]
    assert not failed, f"{len(failed)} requests did not end 200: {failed[:5]}"
    retried = sum(o[1] > 1 for o in outcomes)
    after = [o for o in outcomes if o[3] > stopped_at[0] + 0.5]
    assert len(after) >= 20, "too few requests were sent after the stop to show anything"
    # Once the victim is gone every answer comes from the survivor (alone, or after a failed try).
    assert all(o[2].endswith(stack.address("scorer-2")) for o in after), after[:5]
    assert httpx.get(f"{survivor.base}/readyz", timeout=5).status_code == 200
    # nginx itself moved requests off the stopped replica (X-Upstream lists both tries): the
    # proxy_next_upstream settings, not the client's retry, kept them from failing.
    moved = sum("," in o[2] for o in outcomes)
    assert moved >= 1, "nginx never retried a request on the other replica"
    print(f"nginx retried {moved} requests on the other replica; client-side retries: {retried} of 200")

    # Prometheus sees the stopped replica down: what ReplicaDown alerts on.
    down = f'up{{job="anomaly-scores", instance="{stack.address("scorer-1")}"}} == 0'
    wait_for("Prometheus reports the stopped replica down", lambda: stack.query(down), 15)
