"""Latency of small scoring requests while hostile ones run: four clients each sending, over
and over, 64 images of 4000x4000 (1-bit PNG, 2 kB each on the wire, 1 G pixels decoded in
all) with `timeout_ms: 500`, against `gansentry serve` on the shipped models.

Issue 18's targets: every such request is answered within 1 s (504 past its deadline or 413
past the pixel budget), and the small requests' p99 stays within 2x of its unloaded value.
Two rounds: the default pixel budget (the huge requests get 413 from the image headers),
and a budget raised past them, so that their decoding runs and the deadline must stop it.

Not a test and not run in CI (about a minute):

    python benchmarks/hostile_benchmark.py [--seconds 15] [--models-dir models]

Writes benchmarks/results/hostile.json."""

from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "mnist-ganomaly"
HUGE_CLIENTS = 4
HUGE_IMAGES = 64
HUGE_SIDE = 4000
HUGE_TIMEOUT_MS = 500
JSON = {"content-type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def start_server(models_dir: Path, log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "gansentry.cli", "serve", "--host", "127.0.0.1",
        "--port", str(port), "--models-dir", str(models_dir), "--providers", "cpu",
        "--log-level", "warning",
    ]  # fmt: skip
    out = open(log, "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
    )
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready in 120 s")


def small_latencies(url: str, body: bytes, seconds: float) -> list[float]:
    """One closed-loop client: each request sent as soon as the previous one is answered."""
    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            r = client.post("/score", content=body, headers=JSON)
            latencies.append(time.perf_counter() - started)
            if r.status_code != 200:
                raise RuntimeError(f"a small request failed: {r.status_code} {r.text[:200]}")
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


def hammer(url: str, huge: bytes, period_s: float, stop: Any, answers: Any) -> None:
    """HUGE_CLIENTS threads sending `huge` until `stop`; puts [(status, seconds)] once."""
    done: list[tuple[int, float]] = []

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                started = time.perf_counter()
                r = client.post("/score", content=huge, headers=JSON)
                took = time.perf_counter() - started
                done.append((r.status_code, took))
                stop.wait(max(0.0, period_s - took))

    threads = [threading.Thread(target=client_loop) for _ in range(HUGE_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answers.put(done)


def round_trip(
    url: str, small: bytes, huge: bytes, seconds: float, period_s: float
) -> dict[str, Any]:
    """Each huge client sends its next request when the last is answered, and not sooner
    than `period_s` after the last one started (0: a flood). The huge clients run in a
    process of their own, so the GIL they hold does not show in the small requests' times;
    bodies are serialised once, up front, since the load generator shares the machine."""
    small_latencies(url, small, 2.0)  # warm up
    unloaded = small_latencies(url, small, seconds)
    ctx = multiprocessing.get_context("spawn")
    stop, answers = ctx.Event(), ctx.Queue()
    load = ctx.Process(target=hammer, args=(url, huge, period_s, stop, answers))
    load.start()
    time.sleep(2.0)  # the process is up and all four clients in flight
    loaded = small_latencies(url, small, seconds)
    stop.set()
    huge_answers: list[tuple[int, float]] = answers.get(timeout=120)
    load.join(30)
    statuses: dict[str, int] = {}
    for status, _ in huge_answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    huge_s = [s for _, s in huge_answers]
    result = {
        "small_unloaded": summary(unloaded),
        "small_under_huge": summary(loaded),
        "huge_requests": {
            "n": len(huge_answers),
            "statuses": statuses,
            "max_s": round(max(huge_s), 3),
            "p50_s": round(float(np.percentile(huge_s, 50)), 3),
        },
    }
    p99_ratio = result["small_under_huge"]["p99_ms"] / result["small_unloaded"]["p99_ms"]
    result["p99_ratio"] = round(p99_ratio, 2)
    result["targets_met"] = {
        "huge answered within 1 s (504 or 413)": max(huge_s) < 1.0
        and set(statuses) <= {"504", "413"},
        "small p99 within 2x of unloaded": p99_ratio <= 2.0,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    args = parser.parse_args()

    huge_png = png(Image.new("1", (HUGE_SIDE, HUGE_SIDE)))
    inputs = [{"image": huge_png}] * HUGE_IMAGES
    huge = json.dumps({"model": MODEL, "inputs": inputs, "timeout_ms": HUGE_TIMEOUT_MS}).encode()
    digit = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    small = json.dumps({"model": MODEL, "inputs": [{"image": png(digit)}]}).encode()
    raised = {"GANSENTRY_MAX_REQUEST_PIXELS": str(10**10)}
    rounds = {
        "default budget (413), each client once a second": ({}, 1.0),
        "default budget (413), flood: each client again at once": ({}, 0.0),
        "budget raised past them (decoded until the deadline: 504), flood": (raised, 0.0),
    }
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "huge_request": f"{HUGE_IMAGES} x {HUGE_SIDE}x{HUGE_SIDE} 1-bit PNG, "
        f"timeout_ms {HUGE_TIMEOUT_MS}, from {HUGE_CLIENTS} clients at once",
        "small_request": "one 28x28 PNG, one closed-loop client",
        "rounds": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, (env, period_s) in rounds.items():
            proc, url = start_server(args.models_dir, Path(tmp) / "serve.log", env)
            try:
                results["rounds"][name] = round_trip(url, small, huge, args.seconds, period_s)
            finally:
                proc.terminate()
                proc.wait(30)
            print(name, json.dumps(results["rounds"][name], indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS / 'hostile.json'}")


if __name__ == "__main__":
    main()
