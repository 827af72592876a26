"""The docker compose stack, images and monitoring config, checked without a Docker engine:
Debian's docker-compose v1 renders and validates the compose files, promtool checks and unit-
tests the Prometheus rules, and the Dockerfiles, dashboard and provisioning are read as data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from service import metrics

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
PROM_DIR = ROOT / "docker" / "prometheus"
GRAFANA_DIR = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "gansentry.json"
DOCKERFILES = {
    "api": ROOT / "docker" / "Dockerfile.api",
    "worker": ROOT / "docker" / "Dockerfile.worker",
}
DATASOURCE_UID = "gansentry-prometheus"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (.ci/run installs it from Debian)"
    return path


def compose_config(*files: Path, env_file: Path | None = None) -> dict[str, Any]:
    """`docker-compose config`: v1 interpolates, validates against the compose spec, renders."""
    cmd = [_tool("docker-compose"), "--project-directory", str(ROOT)]
    if env_file is not None:
        cmd += ["--env-file", str(env_file)]
    for f in files:
        cmd += ["-f", str(f)]
    done = subprocess.run(cmd + ["config"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return compose_config(COMPOSE)


class _Reset:
    """Compose v2's `!reset` tag: the key is removed from the merged model."""


class _ComposeLoader(yaml.SafeLoader):
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())


def merge_compose(base: Any, override: Any) -> Any:
    """Compose-spec merge for the shapes our files use: mappings merge, `!reset` removes,
    scalars and `command`-like sequences are replaced."""
    if isinstance(override, dict) and isinstance(base, dict):
        out = dict(base)
        for key, value in override.items():
            if isinstance(value, _Reset):
                out.pop(key, None)
            elif key in out:
                out[key] = merge_compose(out[key], value)
            else:
                out[key] = value
        return out
    return override


def test_compose_file_validates_with_and_without_env_file(config: dict[str, Any]) -> None:
    with_env = compose_config(COMPOSE, env_file=ROOT / ".env.example")
    assert set(config["services"]) == {
        "redis",
        "api",
        "worker",
        "prometheus",
        "grafana",
        "dcgm-exporter",
    }
    assert with_env["services"]["api"]["ports"] == config["services"]["api"]["ports"]


def test_every_service_has_healthcheck_and_conditional_depends_on(config: dict[str, Any]) -> None:
    services = config["services"]
    for name, svc in services.items():
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond.get("condition") == "service_healthy", f"{name} -> {dep}: {cond}"
    # Everything that talks to another service waits for it to be healthy.
    expected = {
        "api": {"redis"},
        "worker": {"redis"},
        "prometheus": {"api"},
        "grafana": {"prometheus"},
    }
    for name, deps in expected.items():
        assert set(services[name]["depends_on"]) == deps, name


def test_worker_reserves_a_gpu_and_can_scale(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "container_name" not in worker
    assert "ports" not in worker, "a fixed host port breaks --scale worker=N"
    assert worker["expose"] == ["9100"]
    assert worker["environment"]["GANSENTRY_REDIS_URL"] == "redis://redis:6379/0"
    assert worker["build"]["args"]["RUNTIME_BASE"].startswith("nvidia/cuda:13.")
    assert "cudnn-runtime-ubuntu24.04" in worker["build"]["args"]["RUNTIME_BASE"]
    assert worker["command"][:2] == ["gansentry", "worker"]
    _assert_models_read_only(worker)


def mounts(svc: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only), from v1's rendering of short or long volume syntax."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            out[target] = (source, mode == ["ro"])
        else:
            out[v["target"]] = (v["source"], bool(v.get("read_only")))
    return out


def _assert_models_read_only(svc: dict[str, Any]) -> None:
    assert mounts(svc)["/models"] == (str(ROOT / "models"), True), svc["volumes"]
    assert svc["environment"]["GANSENTRY_MODELS_DIR"] == "/models"


def test_api_publishes_8000_uses_redis_and_mounts_models_read_only(config: dict[str, Any]) -> None:
    api = config["services"]["api"]
    (port,) = api["ports"]
    assert (int(port["published"]), int(port["target"])) == (8000, 8000)
    assert api["environment"]["GANSENTRY_REDIS_URL"] == "redis://redis:6379/0"
    assert api["command"][:2] == ["gansentry", "serve"]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    _assert_models_read_only(api)
    assert config["services"]["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_grafana_is_provisioned_with_anonymous_viewer(config: dict[str, Any]) -> None:
    grafana = config["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_SECURITY_ADMIN_USER"] and env["GF_SECURITY_ADMIN_PASSWORD"]
    assert "/api/health" in " ".join(grafana["healthcheck"]["test"])
    volumes = mounts(grafana)
    assert volumes["/etc/grafana/provisioning"] == (str(GRAFANA_DIR / "provisioning"), True)

    datasources = yaml.safe_load(
        (GRAFANA_DIR / "provisioning/datasources/prometheus.yaml").read_text()
    )
    (ds,) = datasources["datasources"]
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == "prometheus"
    assert ds["url"] == "${PROMETHEUS_URL}" and env["PROMETHEUS_URL"] == "http://prometheus:9090"

    providers = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/gansentry.yaml").read_text())
    (provider,) = providers["providers"]
    dash_dir = provider["options"]["path"]
    assert volumes[dash_dir] == (str(DASHBOARD.parent), True)
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dash_dir}/{DASHBOARD.name}"


def test_prometheus_mounts_its_config_and_dcgm_is_gpu_profile_only(config: dict[str, Any]) -> None:
    prom = config["services"]["prometheus"]
    assert mounts(prom)["/etc/prometheus"] == (str(PROM_DIR), True)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert config["services"]["dcgm-exporter"]["profiles"] == ["gpu"]


def test_cpu_override_drops_the_gpu_and_still_validates(tmp_path: Path) -> None:
    base = yaml.safe_load(COMPOSE.read_text())
    override = yaml.load(COMPOSE_CPU.read_text(), Loader=_ComposeLoader)  # noqa: S506
    merged = merge_compose(base, override)
    merged_file = tmp_path / "docker-compose.merged.yml"
    merged_file.write_text(yaml.safe_dump(merged, sort_keys=False))
    rendered = compose_config(merged_file)
    worker = rendered["services"]["worker"]
    assert "devices" not in worker["deploy"]["resources"].get("reservations", {})
    assert worker["build"]["args"]["RUNTIME_BASE"] == "ubuntu:24.04"
    assert worker["environment"]["GANSENTRY_PROVIDERS"] == "cpu"
    # Nothing else in the stack asks for a GPU outside the opt-in `gpu` profile.
    for name, svc in rendered["services"].items():
        if "gpu" not in svc.get("profiles", []):
            assert "devices" not in str(svc.get("deploy", {})), name


def test_env_example_defines_every_variable_the_compose_files_read() -> None:
    env_example = (ROOT / ".env.example").read_text()
    commented = re.findall(r"^#\s*([A-Z][A-Z0-9_]*)=", env_example, re.M)
    defined = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", env_example, re.M)) | set(commented)
    used: set[str] = set()
    for f in (COMPOSE, COMPOSE_CPU):
        text = f.read_text()
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
        # Every reference has a default, so `docker compose up` works without a .env.
        assert not re.findall(r"\$\{[A-Z0-9_]+\}", text), f.name
    assert used - defined == set()
    assert {"COMPOSE_FILE", "COMPOSE_PROFILES"} <= set(commented)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_is_multistage_nonroot_healthchecked_and_torch_free(kind: str) -> None:
    text = DOCKERFILES[kind].read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) >= 2 and " AS builder" in froms[0], froms
    assert any(ln.startswith("COPY --from=builder /opt/venv") for ln in lines)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    assert any(ln.startswith("HEALTHCHECK ") and "healthcheck.py" in ln for ln in lines)
    installs = [ln for ln in lines if "pip install" in ln]
    assert installs and all('".[serve]"' in ln for ln in installs), installs
    joined = " ".join(installs).lower()
    assert "torch" not in joined.replace("pip show torch", "") and "[train" not in joined
    # The build fails if anything pulled torch in transitively.
    assert "! /opt/venv/bin/pip show torch" in " ".join(installs)


def test_worker_image_matches_onnxruntime_gpu_cuda_and_cudnn() -> None:
    text = DOCKERFILES["worker"].read_text()
    base = re.search(r"^ARG RUNTIME_BASE=(\S+)$", text, re.M)
    assert base, "the worker's runtime base is a build argument (CPU variant)"
    # onnxruntime-gpu 1.31 needs CUDA 13 and cuDNN 9; NVIDIA names CUDA 13 images `-cudnn-`.
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", base.group(1))
    assert "FROM ${RUNTIME_BASE} AS runtime" in text
    assert re.search(r"^ARG BUILDER_BASE=ubuntu:24\.04$", text, re.M)


def test_dockerignore_keeps_what_the_images_copy() -> None:
    ignored = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for must in (".git", "models", "tests", ".env", "*.onnx"):
        assert must in ignored, must
    for dockerfile in DOCKERFILES.values():
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                for src in line.split()[1:-1]:
                    top = src.split("/")[0]
                    assert top not in ignored and src not in ignored, f"{src} is ignored"
                    assert (ROOT / src).exists(), f"{dockerfile.name} copies missing {src}"


def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool = _tool("promtool")
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=PROM_DIR)
        assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_api_and_every_worker_replica() -> None:
    prom = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    assert jobs["api"]["static_configs"] == [{"targets": ["api:8000"]}]
    assert jobs["worker"]["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": 9100, "refresh_interval": "15s"}
    ]


def _exported_series() -> dict[str, set[str]]:
    """Sample name -> labels, for every metric service/metrics.py defines."""
    out: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if isinstance(obj, metrics.ModelInfo):  # a collector, not a client-library metric
            out["gansentry_model_info"] = set(obj.LABELS)
            continue
        if not isinstance(obj, Counter | Gauge | Histogram):
            continue
        labels = set(obj._labelnames)
        name = obj._name
        if isinstance(obj, Counter):
            out[f"{name}_total"] = labels
        elif isinstance(obj, Histogram):
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = labels
            out[f"{name}_count"] = labels
        else:
            out[name] = labels
    return out


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


SELECTOR = re.compile(r"\b(gansentry_[a-z_]+)\b(?:\{([^}]*)\})?")


def test_every_metric_and_label_in_dashboard_and_alerts_is_exported() -> None:
    exported = _exported_series()
    seen = set()
    for expr in dashboard_exprs() + alert_exprs():
        for name, matchers in SELECTOR.findall(expr):
            assert name in exported, f"{name} is not a series service/metrics.py exports"
            for label in re.findall(r"(\w+)\s*[=!]~?", matchers):
                assert label in exported[name] | {"job", "instance"}, f"{name} has no {label}"
            seen.add(name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum"))
    # The dashboard covers every area the issue lists.
    for must in (
        "gansentry_requests_total",
        "gansentry_request_duration_seconds",
        "gansentry_batch_size",
        "gansentry_queue_depth",
        "gansentry_queue_pending",
        "gansentry_inference_duration_seconds",
        "gansentry_workers_alive",
        "gansentry_anomalies_total",
        "gansentry_score_ratio",
        "gansentry_model_info",
    ):
        assert must in seen, must


def test_dashboard_has_fixed_uid_and_uses_the_provisioned_datasource() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "gansentry-overview"
    assert 36 <= dash["schemaVersion"] <= 41
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == DATASOURCE_UID, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE_UID, p["title"]
    (var,) = dash["templating"]["list"]
    assert var["name"] == "model" and var["datasource"]["uid"] == DATASOURCE_UID
    titles = " | ".join(p["title"] for p in panels).lower()
    for word in (
        "request rate",
        "error",
        "p99",
        "batch size",
        "queue",
        "inference",
        "workers",
        "anomaly rate",
        "score distribution",
        "loaded models",
        "providers",
    ):
        assert word in titles, word
    heatmaps = [p for p in panels if p["type"] == "heatmap"]
    assert {t["format"] for p in heatmaps for t in p["targets"]} == {"heatmap"}
