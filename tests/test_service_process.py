"""`gansentry serve` as a real uvicorn process: HTTP over a socket, SIGHUP reload, clean
shutdown, start-up refusal, and no torch anywhere in the service."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from gansentry.preprocessing import decode_image
from tests.fixtures_models import (
    IMAGE_MODEL,
    IMAGE_SPEC,
    ModelRepo,
    add_version,
    b64,
    png_bytes,
    random_pixels,
)

START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gansentry_serve(
    models_dir: Path, log: Path, *flags: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "gansentry.cli", "serve", "--host", "127.0.0.1",
        "--port", str(port), "--models-dir", str(models_dir), *flags,
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        assert proc.poll() is None, f"server exited: {log.read_text()[-2000:]}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready in {START_TIMEOUT_S}s: {log.read_text()[-2000:]}")


def test_serve_scores_over_http_reloads_on_sighup_and_stops_cleanly(
    mutable_repo: ModelRepo, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    with gansentry_serve(mutable_repo.root, log, "--max-batch-delay-ms", "5") as (proc, url):
        wait_ready(proc, url, log)
        png = png_bytes(random_pixels(28, 28, seed=42))
        r = httpx.post(
            f"{url}/score", params={"model": IMAGE_MODEL}, files={"image": ("d.png", png)}
        )
        assert r.status_code == 200, r.text
        json_answer = httpx.post(
            f"{url}/score",
            json={"model": IMAGE_MODEL, "inputs": [{"image": b64(png)}]},
        ).json()
        assert json_answer == r.json()
        import onnxruntime as ort

        session = ort.InferenceSession(
            str(mutable_repo.root / IMAGE_MODEL / "2" / "model.onnx"),
            providers=["CPUExecutionProvider"],
        )
        direct = session.run(["score"], {"x": decode_image(png, IMAGE_SPEC)[None]})[0]
        np.testing.assert_allclose(r.json()["results"][0]["score"], direct[0], rtol=1e-4)
        bad = httpx.post(f"{url}/score", json={"model": IMAGE_MODEL, "inputs": [{"image": "??"}]})
        assert bad.status_code == 422 and bad.json()["detail"].startswith("inputs[0]:")

        add_version(mutable_repo.root, IMAGE_MODEL, 1, 3)
        proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 30
        while httpx.get(f"{url}/models/{IMAGE_MODEL}").json()["latest"] != 3:
            assert time.monotonic() < end, "SIGHUP did not reload"
            time.sleep(0.1)
        r = httpx.post(f"{url}/score", params={"model": IMAGE_MODEL}, files={"image": png})
        assert r.json()["version"] == 3
        metrics = httpx.get(f"{url}/metrics").text
        assert 'gansentry_requests_total{model="digits",status="200"} 3.0' in metrics

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
    text = log.read_text()
    assert "SIGHUP: reloading models" in text
    assert "Application shutdown complete" in text


def test_explicit_gpu_provider_that_fails_stops_start_up(
    model_repo: ModelRepo, tmp_path: Path
) -> None:
    """On a machine without CUDA the process must exit with a clear message; where CUDA
    really loads, the service must say so in /models."""
    log = tmp_path / "serve.log"
    with gansentry_serve(model_repo.root, log, "--providers", "cuda") as (proc, url):
        end = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < end:
            try:
                r = httpx.get(f"{url}/models", timeout=2)
                providers = {v["provider"] for m in r.json()["models"] for v in m["versions"]}
                assert providers == {"cuda"}
                return
            except httpx.TransportError:
                time.sleep(0.2)
        assert proc.returncode == 2
    text = log.read_text()
    assert "cannot start: GANSENTRY_PROVIDERS=cuda but CUDAExecutionProvider" in text
    # The reason once as a log line and once as the CLI's error line; no stack trace.
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("gansentry serve: error: cannot start: GANSENTRY_PROVIDERS=cuda")


SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "models"


def test_auto_provider_start_says_once_what_serves_without_ort_error_blocks(
    tmp_path: Path,
) -> None:
    """Seven shipped model versions, one provider line for the process. Where CUDA is
    missing (onnxruntime-gpu without its libraries), ONNX Runtime's own error blocks stay
    out of the output and the line names the reason; where it loads, the line says so."""
    log = tmp_path / "serve.log"
    with gansentry_serve(SHIPPED_MODELS, log, env={"GANSENTRY_PROVIDERS": "auto"}) as (proc, url):
        wait_ready(proc, url, log)
        served = httpx.get(f"{url}/models", timeout=5).json()["models"]
    text = log.read_text()
    assert sum(len(m["versions"]) for m in served) >= 2
    lines = [line for line in text.splitlines() if "service.providers" in line]
    assert len(lines) == 1, text
    assert re.search(r"serving on (CPU|CUDA|TensorRT)", lines[0]), lines[0]
    providers = {v["provider"] for m in served for v in m["versions"]}
    if providers == {"cpu"}:
        assert re.search(r"GPU providers unavailable \(.+\); serving on CPU", lines[0])
        assert "/" not in lines[0].split("unavailable", 1)[1], "no paths in the reason"
    for spam in ("EP Error", "[E:onnxruntime", "[W:onnxruntime", "Falling back to"):
        assert spam not in text


def test_service_never_imports_torch(model_repo: ModelRepo) -> None:
    code = f"""
import sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
import gansentry.cli, service.cli, service.batching.embedded
app = create_app(Settings(models_dir={str(model_repo.root)!r}))
with TestClient(app) as client:
    body = {{"model": "digits", "inputs": [{{"array": [[[0.5] * 32] * 32]}}]}}
    r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
gansentry.cli.build_parser()
leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not leaked, leaked[:5]
print("no torch")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == "no torch"


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    cases = [
        (["serve", "--models-dir", str(tmp_path / "none")], "models directory"),
        (["worker", "--models-dir", str(tmp_path)], "a worker needs --redis-url"),
        (
            ["serve", "--batching", "redis", "--models-dir", str(tmp_path)],
            "GANSENTRY_BATCHING=redis needs GANSENTRY_REDIS_URL",
        ),
        (
            ["serve", "--batching", "kafka", "--models-dir", str(tmp_path)],
            "unknown batching backend 'kafka'; one of embedded, redis",
        ),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GANSENTRY_")}
    for argv, message in cases:
        out = subprocess.run(
            [sys.executable, "-m", "gansentry.cli", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
        )
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"gansentry {argv[0]}: error: ")
        assert message in lines[0]
