"""The deployment files, checked without running them: promtool on the Prometheus config and alerts,
every metric name in the dashboard and the alerts against what a live app exports, structural checks
of the Kubernetes manifests, the compose file, the Dockerfile and its build context."""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.api.main import create_app
from app.api.settings import Settings

from ..conftest import manifold_rows

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy/prometheus"
GRAFANA = ROOT / "deploy/grafana"
KUBERNETES = ROOT / "deploy/kubernetes"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus; scripts/system-deps.sh)"
)
# Alert -> its `for` (None: fires at the first evaluation that finds it true).
REQUIRED_ALERTS = {
    "ReplicaDown": "1m",
    "NoReplicaUp": "1m",
    "HighErrorRate": "5m",
    "HighLatencyP99": "5m",
    "ScoringShed": "10m",
    "FlaggedRateFarAboveCalibrated": "15m",
    "ModelVersionSkew": "30m",
    "ReloadFailed": None,
}
# A metric name in PromQL: the service's own, the process and interpreter collectors' (process_*,
# python_*), or `up` (Prometheus' per-target series).
METRIC = re.compile(r"\b(anomaly_[a-z_]+|process_[a-z_]+|python_[a-z_]+|up)\b")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def alert_rules(path: Path = PROMETHEUS / "alerts.yml") -> dict[str, dict[str, Any]]:
    groups = load_yaml(path)["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


@pytest.fixture(scope="module")
def exported(tiny_bundle) -> set[str]:
    """Every sample name a live app exposes on /metrics once it has scored a request."""
    app = create_app(Settings(model_path=tiny_bundle, warmup_rows=4))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the app did not become ready within 60 s"
            time.sleep(0.1)
        response = client.post("/score", json={"instances": manifold_rows(5, seed=81).tolist()})
        assert response.status_code == 200, response.text
        text = client.get("/metrics").text
    names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert "anomaly_flagged_total" in names and "anomaly_score_bucket" in names  # labelled series exist
    return names


def assert_exported(names: set[str], exported: set[str], where: str) -> None:
    unknown = sorted(n for n in names if n != "up" and n not in exported)
    assert not unknown, f"{where} uses metrics the service does not export: {unknown}"


# ---------------------------------------------------------------- Prometheus


@needs_promtool
def test_promtool_accepts_the_shipped_prometheus_config_and_finds_its_rules():
    result = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", PROMETHEUS / "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_required_alerts_exist_with_their_durations_and_annotations(exported):
    rules = alert_rules()
    for name, duration in REQUIRED_ALERTS.items():
        assert name in rules, f"alert {name} missing"
        assert rules[name].get("for") == duration, name
    for name, rule in rules.items():
        assert {"summary", "description"} <= rule["annotations"].keys(), name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        used = set(METRIC.findall(rule["expr"]))
        assert used, f"{name} uses no metric"
        assert_exported(used, exported, f"alert {name}")
    assert "anomaly_threshold_fpr" in rules["FlaggedRateFarAboveCalibrated"]["expr"]
    assert "by (job, method, threshold)" in rules["FlaggedRateFarAboveCalibrated"]["expr"]
    assert 'endpoint="/score"' in rules["HighLatencyP99"]["expr"]
    assert re.fullmatch(
        r'increase\(anomaly_reloads_total\{result="failure"\}\[\d+m\]\) > 0', rules["ReloadFailed"]["expr"]
    )
    assert "anomaly_reloads_total" in exported  # its series exist before any reload: see metrics.py


def test_the_target_alerts_watch_the_scorers_scrape_job():
    """ReplicaDown sees a target that is down, NoReplicaUp no target up at all (down or gone): both on
    the job that scrapes the scorers, which absent() cannot label by itself."""
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    (job,) = [
        j["job_name"]
        for j in config["scrape_configs"]
        if all(t.startswith("scorer") for group in j["static_configs"] for t in group["targets"])
    ]
    rules = alert_rules()
    assert rules["ReplicaDown"]["expr"] == f'up{{job="{job}"}} == 0'
    assert re.fullmatch(rf'absent\(up\{{job="{job}"\}} == 1\)', rules["NoReplicaUp"]["expr"])
    assert rules["NoReplicaUp"]["labels"]["job"] == job
    assert rules["NoReplicaUp"]["labels"]["severity"] == "critical"


def test_the_alert_unit_tests_show_every_alert_firing_and_silent():
    tests = load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]
    fired, silent = set(), set()
    for group in tests:
        for case in group["alert_rule_test"]:
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    assert set(alert_rules()) <= fired, f"alerts never shown firing: {set(alert_rules()) - fired}"
    assert set(alert_rules()) <= silent, f"alerts never shown silent: {set(alert_rules()) - silent}"


@needs_promtool
def test_promtool_runs_the_alert_unit_tests():
    result = promtool("test", "rules", PROMETHEUS / "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def broken_rules(tmp_path: Path, alert: str, **changes: str) -> None:
    """alerts.yml in tmp_path, with `changes` made to one alert's rule."""
    spec = load_yaml(PROMETHEUS / "alerts.yml")
    (rule,) = [rule for group in spec["groups"] for rule in group["rules"] if rule.get("alert") == alert]
    rule.update(changes)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(spec, sort_keys=False))


@needs_promtool
@pytest.mark.parametrize("alert", sorted(alert_rules()))
def test_the_alert_unit_tests_fail_when_an_alert_cannot_fire(alert, tmp_path):
    """The unit tests have teeth: an alert whose `for` never elapses fails them."""
    broken_rules(tmp_path, alert, **{"for": "1000h"})
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path / "alerts_test.yml")
    result = promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert result.returncode != 0
    assert f"alertname: {alert}" in result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize("alert", sorted(alert_rules()))
def test_the_silent_alert_unit_tests_fail_when_an_alert_always_fires(alert, tmp_path):
    """The silent cases have teeth too: kept alone (they pass with the real rule), they fail when the
    rule fires whatever the series."""
    tests = load_yaml(PROMETHEUS / "alerts_test.yml")
    groups = []
    for group in tests["tests"]:
        cases = [c for c in group["alert_rule_test"] if c["alertname"] == alert and not c.get("exp_alerts")]
        if cases:
            groups.append({**group, "alert_rule_test": cases})
    assert groups, f"{alert} is never shown silent"
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump({**tests, "tests": groups}, sort_keys=False))
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    result = promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken_rules(tmp_path, alert, expr="vector(1)", **{"for": "0m"})
    result = promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert result.returncode != 0
    assert f"alertname: {alert}" in result.stdout + result.stderr


def test_prometheus_scrapes_each_scorer_not_the_load_balancer():
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "anomaly-scores"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t: group["labels"]["replica"] for group in job["static_configs"] for t in group["targets"]}
    compose = load_yaml(ROOT / "docker-compose.yml")["services"]
    scorers = sorted(name for name in compose if name.startswith("scorer"))
    assert targets == {f"{name}:8000": name for name in scorers}


# ---------------------------------------------------------------- Grafana


def datasource_refs(node: Any) -> list[Any]:
    """Every `datasource` a dashboard names, at any depth (panels, targets, variables)."""
    if isinstance(node, dict):
        own = [node["datasource"]] if "datasource" in node else []
        return own + [ref for value in node.values() for ref in datasource_refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in datasource_refs(item)]
    return []


def test_the_dashboard_takes_its_datasource_from_a_variable_not_a_uid():
    dashboard = json.loads((GRAFANA / "dashboards/anomaly-scores.json").read_text())
    variables = dashboard["templating"]["list"]
    (variable,) = [v for v in variables if v["type"] == "datasource"]
    assert variable["name"] == "datasource" and variable["query"] == "prometheus"
    assert not variable.get("current"), "a chosen datasource would pin a uid of one Grafana"
    assert variables[0] is variable, "the variables below query through it"
    refs = datasource_refs(dashboard)
    assert len(refs) > len(dashboard["panels"])  # panels, their targets and the query variable
    pinned = [ref for ref in refs if ref != {"type": "prometheus", "uid": "${datasource}"}]
    assert not pinned, pinned
    # The compose stack's Grafana has this one Prometheus datasource: the variable's first choice.
    datasources = load_yaml(GRAFANA / "provisioning/datasources/prometheus.yml")["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"]


def test_the_dashboard_queries_only_exported_metrics_and_has_every_panel(exported):
    dashboard = json.loads((GRAFANA / "dashboards/anomaly-scores.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = []
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        assert panel["targets"], panel["title"]
        exprs += [target["expr"] for target in panel["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert_exported(used, exported, "the dashboard")
    assert used >= {
        "up",
        "anomaly_requests_total",  # request and error rate
        "anomaly_request_duration_seconds_bucket",  # latency percentiles
        "anomaly_rows_scored_total",  # rows per second
        "anomaly_score_bucket",  # score distribution against the calibration quantiles
        "anomaly_score_count",
        "anomaly_flagged_total",  # flagged rate against the false-positive rate
        "anomaly_threshold_fpr",
        "anomaly_model_info",  # model version per replica
        "anomaly_reloads_total",  # reloads by result
        "process_resident_memory_bytes",  # each replica's memory, CPU and file descriptors
        "process_cpu_seconds_total",
        "process_open_fds",
    }
    for expr in exprs:
        if "process_" in expr:  # Prometheus exports process_* of its own, under its own job
            assert 'job="anomaly-scores"' in expr, expr
    # Flagged per row scored: numerator and denominator matched per method.
    (flagged,) = [e for e in exprs if "anomaly_flagged_total" in e]
    assert "sum by (method, threshold) (rate(anomaly_flagged_total" in flagged
    assert "/ on (method) group_left sum by (method) (rate(anomaly_rows_scored_total" in flagged
    joined = "\n".join(exprs)
    for q in ("0.5", "0.9", "0.99"):
        assert re.search(
            rf"histogram_quantile\({q}, [^\n]*anomaly_request_duration_seconds_bucket", joined
        ), q
    assert re.search(r'code=~"5\.\."', joined), "no 5xx error rate"


def test_grafana_provisioning_points_at_prometheus_and_the_mounted_dashboards():
    datasource = load_yaml(GRAFANA / "provisioning/datasources/prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = load_yaml(GRAFANA / "provisioning/dashboards/dashboards.yml")["providers"][0]
    grafana = load_yaml(ROOT / "docker-compose.yml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


# ---------------------------------------------------------------- docker compose


def seconds(duration: str) -> float:
    value, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration).groups()
    return float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def test_compose_runs_two_scorers_behind_nginx_with_monitoring_and_healthchecks():
    services = load_yaml(ROOT / "docker-compose.yml")["services"]
    scorers = sorted(name for name in services if name.startswith("scorer"))
    assert len(scorers) >= 2
    assert {"nginx", "prometheus", "grafana"} <= services.keys()
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert "stop_grace_period" in service, f"{name} has no stop_grace_period"
    default_grace = Settings.model_fields["shutdown_grace_s"].default
    for name in scorers:
        scorer = services[name]
        assert scorer["build"]["target"] == "cpu"
        grace = float(scorer["environment"].get("ANOMALY_SHUTDOWN_GRACE_S", default_grace))
        assert seconds(scorer["stop_grace_period"]) > grace, "Docker would SIGKILL requests in flight"
        assert "/readyz" in " ".join(scorer["healthcheck"]["test"])
        assert scorer.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert "ports" not in scorer, f"{name} is reached through nginx only"
    assert set(services["nginx"]["depends_on"]) == set(scorers)
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"compose mounts a missing {source}"
    # nginx balances over exactly the compose scorers, with the retry and health settings.
    nginx = (ROOT / "deploy/nginx/nginx.conf").read_text()
    upstream = re.search(r"upstream anomaly_scorers \{(.*?)\}", nginx, re.DOTALL).group(1)
    assert re.findall(r"server ([\w-]+):8000 max_fails=\d+ fail_timeout=\d+s;", upstream) == scorers
    assert re.search(r"^\s*keepalive \d+;", upstream, re.MULTILINE)
    for directive in (
        "proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;",
        "proxy_next_upstream_tries 2;",
        "client_max_body_size 16m;",
        "proxy_set_header X-Request-ID",
        'proxy_set_header Connection "";',
        "location = /nginx-health",
    ):
        assert directive in nginx, directive


# ---------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (keyword, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\bAS (\S+)$", args, re.IGNORECASE)
            current = stages.setdefault(match.group(1) if match else f"<unnamed {len(stages)}>", [])
        current.append((keyword, args.strip()))
    return stages


def test_dockerfile_has_cpu_and_gpu_targets_that_run_the_service_as_a_non_root_user():
    stages = dockerfile_stages()
    assert {"cpu-builder", "cpu", "gpu-builder", "gpu"} <= stages.keys()
    assert re.match(r"\$\{PYTHON_IMAGE\}", stages["cpu"][0][1])
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert re.search(r"ARG CUDA_IMAGE=(nvidia/cuda|pytorch/pytorch):\S+", text)
    for target, builder, extras in (("cpu", "cpu-builder", "cpu"), ("gpu", "gpu-builder", "gpu")):
        runs = " ".join(a for k, a in stages[builder] if k == "RUN")
        assert f"scripts/install_runtime.sh {extras} /opt/venv" in runs
        instructions = stages[target]
        args = {k: [a for kk, a in instructions if kk == k] for k in {k for k, _ in instructions}}
        (user,) = args["USER"]
        assert user.split(":")[0] not in {"root", "0"}
        (healthcheck,) = args["HEALTHCHECK"]
        assert "/readyz" in healthcheck and "urllib" in healthcheck and "curl" not in healthcheck
        assert args["STOPSIGNAL"] == ["SIGTERM"]
        assert [json.loads(a) for a in args["ENTRYPOINT"]] == [
            ["anomaly-scores", "serve", "--host", "0.0.0.0", "--port", "8000"]
        ]
        env = " ".join(args["ENV"])
        assert "ANOMALY_MODEL_PATH=/app/models/default" in env
        assert f"ANOMALY_BACKEND={'onnx' if target == 'cpu' else 'torch'}" in env
        assert "models /app/models" in args["COPY"]
        assert f"--from={builder} /opt/venv /opt/venv" in args["COPY"]
    cpu_builder = " ".join(a for _, a in stages["cpu-builder"])
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu_builder
    assert 'WITH_TORCH="${CPU_TORCH}"' in cpu_builder and "CPU_TORCH=0" in cpu_builder  # no torch
    assert "ANOMALY_DEVICE=cuda" in " ".join(a for k, a in stages["gpu"] if k == "ENV")


def test_install_steps_live_in_one_script_that_both_the_image_and_the_cpu_runtime_build_use(tmp_path):
    install = (ROOT / "scripts/install_runtime.sh").read_text()
    assert 'cpu) extras="serve"' in install and 'gpu) extras="serve,train"' in install
    assert 'with_torch="${WITH_TORCH:-0}"' in install  # the CPU runtime carries no PyTorch by default
    build = (ROOT / "scripts/build_cpu_runtime.sh").read_text()
    assert re.search(r"scripts/install_runtime\.sh\" cpu ", build)
    for script in ("install_runtime.sh", "build_cpu_runtime.sh"):
        result = subprocess.run(
            ["bash", "-n", ROOT / "scripts" / script], capture_output=True, timeout=10, check=False
        )
        assert result.returncode == 0, result.stderr
    # A wrong target is refused before anything is created.
    result = subprocess.run(
        ["bash", ROOT / "scripts/install_runtime.sh", "tpu", tmp_path / "venv"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 2 and "cpu or gpu" in result.stderr
    result = subprocess.run(
        ["bash", ROOT / "scripts/install_runtime.sh", "cpu", tmp_path / "venv"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
        env=os.environ | {"WITH_TORCH": "maybe"},
    )
    assert result.returncode == 2 and "WITH_TORCH must be 0 or 1" in result.stderr
    assert not (tmp_path / "venv").exists()


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        compiled = regex(raw.removeprefix("!").strip("/"))
        if any(compiled.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_else():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = set()
    for stage in dockerfile_stages().values():
        for keyword, args in stage:
            if keyword == "COPY" and not args.startswith("--from"):
                sources.update(a for a in args.split()[:-1] if not a.startswith("--"))
    assert sources >= {"app", "models", "pyproject.toml", "README.md", "scripts/install_runtime.sh"}
    for source in sources:
        path = ROOT / source
        assert not dockerignore_excludes(patterns, source), f"{source} is not in the context"
        if path.is_dir():  # and whatever lies in it, e.g. a bundle added to models/ later
            assert not dockerignore_excludes(patterns, f"{source}/new/bundle.json"), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not dockerignore_excludes(patterns, relative), f"{relative} is not in the context"
    for relative in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/CACHEDIR.TAG",
        "out/scores.csv",
        "anomaly_scores.egg-info/PKG-INFO",
        "app/service/__pycache__/main.cpython-311.pyc",
        "scripts/setup.sh",
        "data/breast-cancer-train.csv",
    ):
        assert dockerignore_excludes(patterns, relative), f"{relative} would be sent to the builder"


# ---------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the manifest, for every resource kustomization.yaml lists, plus the ServiceMonitor."""
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml", "servicemonitor.yaml"}
    assert set(listed) == on_disk, "kustomization.yaml must list every manifest"
    found = {}
    for name in [*listed, "servicemonitor.yaml"]:
        for document in yaml.safe_load_all((KUBERNETES / name).read_text()):
            assert document["apiVersion"] and document["kind"], name
            assert document["metadata"]["name"], name
            assert document["kind"] not in found, f"two {document['kind']}s"
            found[document["kind"]] = document
    return found


def test_the_deployment_probes_limits_mounts_the_model_and_runs_unprivileged(manifests):
    deployment = manifests["Deployment"]
    assert deployment["apiVersion"] == "apps/v1"
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in {"http", 8000}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()
    # The model: a read-only PVC mount that ANOMALY_MODEL_PATH points into.
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if "persistentVolumeClaim" in volumes[m["name"]]]
    claim = volumes[mount["name"]]["persistentVolumeClaim"]
    assert claim["claimName"] == manifests["PersistentVolumeClaim"]["metadata"]["name"] == "anomaly-models"
    assert mount["readOnly"] is True and mount["mountPath"] == "/models"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ANOMALY_MODEL_PATH"].startswith(mount["mountPath"] + "/")
    # Unprivileged, as the image's USER.
    pod_security, security = pod["securityContext"], container["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    user = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert pod_security["runAsUser"] == int(user)
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # Graceful stop: the preStop sleep and the shutdown fit in the grace period.
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    grace = float(env.get("ANOMALY_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default))
    assert int(sleep[1]) + grace < pod["terminationGracePeriodSeconds"]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["http"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_service_hpa_pdb_and_servicemonitor_point_at_the_deployment(manifests):
    deployment = manifests["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = manifests["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {"http", 8000}
    hpa = manifests["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    pdb = manifests["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    pvc = manifests["PersistentVolumeClaim"]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    monitor = manifests["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]


def test_the_kserve_predictor_serves_the_v2_protocol_from_its_storage_uri():
    service = load_yaml(ROOT / "deploy/kserve/inferenceservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = service["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # where KServe mounts what STORAGE_URI names
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["STORAGE_URI"].startswith("pvc://anomaly-models/")
    assert env["ANOMALY_MODEL_PATH"] == "/mnt/models"  # the storage initializer's destination
    port = container["ports"][0]["containerPort"]
    assert port == 8000  # the image's entrypoint: serve --port 8000
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
    kubernetes = load_yaml(ROOT / "deploy/kubernetes/deployment.yaml")["spec"]["template"]["spec"]
    assert predictor["terminationGracePeriodSeconds"] == kubernetes["terminationGracePeriodSeconds"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert int(env["ANOMALY_SHUTDOWN_GRACE_S"]) + 10 < predictor["terminationGracePeriodSeconds"]


def test_the_v2_probes_the_kserve_predictor_uses_answer_as_it_expects(tiny_bundle):
    with TestClient(create_app(Settings(model_path=tiny_bundle, warmup_rows=4))) as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        deadline = time.monotonic() + 60
        while (ready := client.get("/v2/health/ready")).status_code != 200:
            assert ready.status_code == 503 and ready.json() == {"ready": False}
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ready.json() == {"ready": True}
