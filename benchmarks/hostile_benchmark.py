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


def small_latencies(url: str, body: dict, seconds: float) -> list[float]:
    """One closed-loop client: each request sent as soon as the previous one is answered."""
    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            r = client.post("/score", json=body)
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


def round_trip(url: str, small: dict, huge: dict, seconds: float) -> dict[str, Any]:
    small_latencies(url, small, 2.0)  # warm up
    unloaded = small_latencies(url, small, seconds)
    stop = threading.Event()
    huge_answers: list[tuple[int, float]] = []

    def hammer() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                started = time.perf_counter()
                r = client.post("/score", json=huge)
                huge_answers.append((r.status_code, time.perf_counter() - started))

    threads = [threading.Thread(target=hammer) for _ in range(HUGE_CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # all four in flight
    loaded = small_latencies(url, small, seconds)
    stop.set()
    for t in threads:
        t.join()
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
    huge = {
        "model": MODEL,
        "inputs": [{"image": huge_png}] * HUGE_IMAGES,
        "timeout_ms": HUGE_TIMEOUT_MS,
    }
    digit = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    small = {"model": MODEL, "inputs": [{"image": png(digit)}]}
    rounds = {
        "default pixel budget": {},
        "pixel budget raised past the huge requests": {
            "GANSENTRY_MAX_REQUEST_PIXELS": "10000000000"
        },
    }
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "huge_request": f"{HUGE_IMAGES} x {HUGE_SIDE}x{HUGE_SIDE} 1-bit PNG, "
        f"timeout_ms {HUGE_TIMEOUT_MS}, {HUGE_CLIENTS} clients in a loop",
        "small_request": "one 28x28 PNG, one closed-loop client",
        "rounds": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in rounds.items():
            proc, url = start_server(args.models_dir, Path(tmp) / "serve.log", env)
            try:
                results["rounds"][name] = round_trip(url, small, huge, args.seconds)
            finally:
                proc.terminate()
                proc.wait(30)
            print(name, json.dumps(results["rounds"][name], indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS / 'hostile.json'}")


if __name__ == "__main__":
    main()
