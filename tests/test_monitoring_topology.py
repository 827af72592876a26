"""The compose topology, natively on loopback: Redis, `gansentry serve`, two `gansentry worker`
processes and a real Prometheus running docker/prometheus/prometheus.yml with only its targets
pointed at loopback. After real traffic (good inputs, bad inputs, and one request that times out
while both workers are frozen), every dashboard expression must return data and every alert
rule must parse, evaluate cleanly and find the series it watches."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.fixtures_models import IMAGE_MODEL, IMAGE_SPEC, TABULAR_MODEL, ModelRepo
from tests.fixtures_redis import RedisServer, free_port, spawn, stop_process

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "gansentry.json"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "5s",
    "$__range": "5m",
    "$model": ".*",
}

pytestmark = pytest.mark.timeout(240)


def prometheus_config(api: str, workers: list[str], prometheus: str) -> dict[str, Any]:
    """docker/prometheus/prometheus.yml with loopback targets and a 1 s scrape; jobs, paths
    and rule files unchanged. The GPU-profile dcgm job keeps its name with no target."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(
        {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"}
    )
    config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]]
    targets = {"api": [api], "worker": workers, "prometheus": [prometheus], "dcgm": []}
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


def _without_targets(config: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(config)
    out.pop("global")
    out["rule_files"] = [Path(f).name for f in out["rule_files"]]
    for job in out["scrape_configs"]:
        job.pop("static_configs", None)
        job.pop("dns_sd_configs", None)
    return out


def _wait(what: str, check, timeout: float, procs: list[Proc]) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for p in procs:
            if p.process.poll() is not None:
                raise RuntimeError(f"{p.name} exited while waiting for {what}:\n{p.tail()}")
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, OSError) as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@dataclass
class Proc:
    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.process, self._log = spawn(self.cmd, self.env, self.log)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def signal(self, sig: int) -> None:
        os.kill(self.process.pid, sig)

    def stop(self) -> None:
        stop_process(self.process, self._log)


@dataclass
class Topology:
    api: str
    prometheus: str
    worker_ports: list[int]
    workers: list[Proc]
    config: dict[str, Any]
    statuses: dict[int, int]

    def query(self, expr: str) -> dict[str, Any]:
        r = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        return r.json()


def _gansentry_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GANSENTRY_")}
    env.update({"GANSENTRY_INTRA_OP_THREADS": "1", "GANSENTRY_PROVIDERS": "cpu"})
    return env


def _image_input(rng: np.random.Generator) -> dict[str, Any]:
    return {"array": rng.random(IMAGE_SPEC.shape, dtype=np.float32).round(3).tolist()}


def _record(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "record": {
            "duration": float(rng.exponential(3.0)),
            "protocol": str(rng.choice(["tcp", "udp", "icmp"])),
            "bytes": float(rng.integers(0, 5000)),
        }
    }


def _drive_traffic(topo: Topology, client: httpx.Client, procs: list[Proc]) -> None:
    rng = np.random.default_rng(0)

    def post(body: dict[str, Any]) -> int:
        status = client.post("/score", json=body).status_code
        topo.statuses[status] = topo.statuses.get(status, 0) + 1
        return status

    good = [
        {"model": IMAGE_MODEL, "inputs": [_image_input(rng) for _ in range(1 + i % 4)]}
        for i in range(24)
    ] + [
        {"model": TABULAR_MODEL, "inputs": [_record(rng) for _ in range(1 + i % 5)]}
        for i in range(24)
    ]
    bad = [
        {"model": "no-such-model", "inputs": [_record(rng)]},
        {"model": IMAGE_MODEL, "inputs": [{"array": [[0.5, 0.5]]}]},
        {"model": TABULAR_MODEL, "inputs": [{"record": {"duration": 1.0}}]},
        {  # a category never seen in training: refused, and counted per field
            "model": TABULAR_MODEL,
            "inputs": [{"record": {"duration": 1.0, "protocol": "sctp", "bytes": 10.0}}],
        },
    ]

    def stuck() -> int:
        """Both workers frozen: the queued request outlives its deadline -> a real 5xx."""
        for w in topo.workers:
            w.signal(signal.SIGSTOP)
        try:
            return post({"model": TABULAR_MODEL, "inputs": [_record(rng)], "timeout_ms": 400})
        finally:
            for w in topo.workers:
                w.signal(signal.SIGCONT)

    # Two waves a few scrapes apart: a counter's first sample is its baseline, so rate() only
    # sees what a series gains after Prometheus first scraped it.
    for wave in (good[::6], good):
        with ThreadPoolExecutor(8) as pool:  # concurrent, so the workers see real batches
            assert set(pool.map(post, wave)) == {200}
        assert [post(b) for b in bad] == [404, 422, 422, 422]
        assert stuck() in (503, 504)
        if wave is not good:
            # The first wave must be every counter's scraped baseline before the second
            # lands; a fixed sleep is not enough on a loaded machine.
            sent = sum(topo.statuses.values())
            _wait(
                "Prometheus to scrape the first wave",
                lambda sent=sent: (
                    _scalar(topo.query('sum(gansentry_requests_total{job="api"})')) == sent
                    and _scalar(topo.query('count(gansentry_batch_size_count{job="worker"})'))
                ),
                30,
                procs,
            )
            time.sleep(2.5)


@pytest.fixture(scope="module")
def topology(model_repo: ModelRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    prometheus_bin = shutil.which("prometheus")
    assert prometheus_bin, "prometheus is not installed (.ci/run installs Debian's package)"
    tmp = tmp_path_factory.mktemp("topology")
    redis_server = RedisServer(tmp / "redis").start()
    procs: list[Proc] = []
    try:
        env = _gansentry_env()
        api_port, prom_port = free_port(), free_port()
        worker_ports = [free_port(), free_port()]
        common = ["--models-dir", str(model_repo.root), "--redis-url", redis_server.url]
        cli = [sys.executable, "-m", "gansentry.cli"]
        api = Proc(
            "api",
            [*cli, "serve", "--host", "127.0.0.1", "--port", str(api_port), *common],
            tmp / "api.log",
            env,
        )
        procs.append(api)
        workers = [
            Proc(
                f"worker-{i}",
                [*cli, "worker", *common, "--metrics-port", str(port), "--name", f"w{i}"],
                tmp / f"worker-{i}.log",
                env,
            )
            for i, port in enumerate(worker_ports)
        ]
        procs += workers
        config = prometheus_config(
            f"127.0.0.1:{api_port}",
            [f"127.0.0.1:{p}" for p in worker_ports],
            f"127.0.0.1:{prom_port}",
        )
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = Proc(
            "prometheus",
            [
                prometheus_bin,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            tmp / "prometheus.log",
            dict(os.environ),
        )
        procs.append(prom)
        topo = Topology(
            api=f"http://127.0.0.1:{api_port}",
            prometheus=f"http://127.0.0.1:{prom_port}",
            worker_ports=worker_ports,
            workers=workers,
            config=config,
            statuses={},
        )
        _wait(
            "Prometheus ready",
            lambda: httpx.get(f"{topo.prometheus}/-/ready", timeout=2).status_code == 200,
            30,
            procs,
        )
        with httpx.Client(base_url=topo.api, timeout=30) as client:
            _wait("API /healthz", lambda: client.get("/healthz").status_code == 200, 60, procs)
            _wait(
                "workers' /metrics",
                lambda: all(
                    httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=2).status_code == 200
                    for p in worker_ports
                ),
                60,
                procs,
            )
            _wait("API sees 2 live workers", lambda: _api_sees_workers(client) >= 2, 30, procs)
            _drive_traffic(topo, client, procs)
        sent = sum(topo.statuses.values())
        # Prometheus has scraped the API after the last request, and both workers are back up.
        _wait(
            "Prometheus to scrape the traffic",
            lambda: (
                _scalar(topo.query('sum(gansentry_requests_total{job="api"})')) == sent
                and _scalar(topo.query('sum(up{job="worker"})')) == 2
            ),
            30,
            procs,
        )
        time.sleep(2)  # a couple more scrapes and rule evaluations past the last change
        yield topo
    except BaseException:
        for p in procs:
            print(f"--- {p.name} log ---\n{p.tail()}")
        raise
    finally:
        for p in procs:
            p.stop()
        redis_server.stop()


def _api_sees_workers(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    found = re.search(r"^gansentry_workers_alive (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _scalar(answer: dict[str, Any]) -> float | None:
    result = answer.get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else None


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unhandled Grafana variable in {expr}"
    return expr


def _panel_targets() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def _alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r for g in rules["groups"] for r in g["rules"]]


def test_generated_config_differs_from_the_shipped_one_only_in_targets(
    topology: Topology,
) -> None:
    shipped = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert _without_targets(topology.config) == _without_targets(shipped)
    assert [j["job_name"] for j in topology.config["scrape_configs"]] == [
        j["job_name"] for j in shipped["scrape_configs"]
    ]


def test_prometheus_scrapes_the_api_and_both_workers(topology: Topology) -> None:
    targets = httpx.get(f"{topology.prometheus}/api/v1/targets", timeout=10).json()
    health = {
        (t["labels"]["job"], t["labels"]["instance"]): t["health"]
        for t in targets["data"]["activeTargets"]
    }
    api_instance = topology.api.removeprefix("http://")
    assert health[("api", api_instance)] == "up"
    for port in topology.worker_ports:
        assert health[("worker", f"127.0.0.1:{port}")] == "up"
    assert topology.statuses[200] > 0 and topology.statuses[422] == 6
    assert topology.statuses.get(504, 0) + topology.statuses.get(503, 0) == 2


@pytest.mark.parametrize(("title", "expr"), _panel_targets())
def test_every_dashboard_expression_returns_data(topology: Topology, title: str, expr: str) -> None:
    answer = topology.query(grafana_to_promql(expr))
    assert answer["status"] == "success", f"{title}: {answer}"
    result = answer["data"]["result"]
    assert result, f"{title}: no data for {grafana_to_promql(expr)}"
    values = [float(r["value"][1]) for r in result]
    assert not all(np.isnan(v) for v in values), f"{title}: only NaN"


def test_dashboard_shows_the_traffic_that_was_sent(topology: Topology) -> None:
    per_model = topology.query("sum by (model) (increase(gansentry_inputs_total[5m]))")
    models = {r["metric"]["model"] for r in per_model["data"]["result"]}
    assert models == {IMAGE_MODEL, TABULAR_MODEL}
    ratio = topology.query(
        grafana_to_promql(next(e for t, e in _panel_targets() if t.startswith("5xx error ratio")))
    )
    by_model = {r["metric"]["model"]: float(r["value"][1]) for r in ratio["data"]["result"]}
    assert by_model[TABULAR_MODEL] > 0, "the timed-out request counts as a 5xx"
    assert by_model[IMAGE_MODEL] == 0
    providers = topology.query("count by (provider) (gansentry_model_info)")
    assert {r["metric"]["provider"] for r in providers["data"]["result"]} == {"cpu"}
    batches = topology.query('sum(gansentry_batch_size_count{job="worker"})')
    assert _scalar(batches), "the workers, not the API, ran the batches"


SELECTOR = re.compile(r"\b((?:gansentry_[a-z_]+|up))\b(\{[^}]*\})?")


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda r: r["alert"])
def test_alert_rule_evaluates_and_its_series_exist(topology: Topology, rule: dict) -> None:
    answer = topology.query(rule["expr"])
    assert answer["status"] == "success", answer
    for name, matchers in SELECTOR.findall(rule["expr"]):
        selector = f"{name}{matchers}"
        found = topology.query(f"count({selector})")
        assert found["status"] == "success" and _scalar(found), f"no series for {selector}"


def test_prometheus_loaded_every_rule_and_evaluates_them_without_error(
    topology: Topology,
) -> None:
    rules = httpx.get(f"{topology.prometheus}/api/v1/rules", timeout=10).json()
    loaded = {r["name"]: r for g in rules["data"]["groups"] for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in _alert_rules()}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    # Two workers heartbeat and serve: the alert that pages for them must be quiet.
    assert loaded["GansentryNoLiveWorkers"]["state"] == "inactive"
    assert loaded["GansentryApiDown"]["state"] == "inactive"


def _healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--timeout", "1", *args],
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_container_healthcheck_against_the_real_processes(topology: Topology) -> None:
    assert _healthcheck(f"{topology.api}/healthz").returncode == 0
    metrics_url = f"http://127.0.0.1:{topology.worker_ports[0]}/metrics"
    assert _healthcheck("--max-heartbeat-age", "30", metrics_url).returncode == 0
    # The API's /metrics carries no worker heartbeat: as a worker probe it must fail.
    done = _healthcheck("--max-heartbeat-age", "30", f"{topology.api}/metrics")
    assert done.returncode == 1 and "no gansentry_worker_heartbeat" in done.stderr
    # A frozen worker answers nothing: unhealthy.
    worker = topology.workers[0]
    worker.signal(signal.SIGSTOP)
    try:
        frozen = _healthcheck("--max-heartbeat-age", "30", metrics_url)
    finally:
        worker.signal(signal.SIGCONT)
    assert frozen.returncode == 1 and "unreachable" in frozen.stderr
    missing = _healthcheck(f"{topology.api}/no-such-path")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
