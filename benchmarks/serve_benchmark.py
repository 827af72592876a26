"""Throughput and latency of `gansentry serve` under a real load generator, against raw
ONNX Runtime in process and against a LitServe server batching the same ONNX model.

Not a test and not run in CI: it takes a few minutes and needs `wrk` on the PATH.

    python benchmarks/serve_benchmark.py                  # builds a GANomaly 1x32x32 if
    python benchmarks/serve_benchmark.py --models-dir models --model mnist-ganomaly

Writes benchmarks/results/serve.json; `benchmarks/write_docs.py` renders it. The targets are the
ones in the service's issue (Performance section); each row says whether it was met."""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gansentry.contract import MODEL_FILE  # noqa: E402
from gansentry.manifest import ImageInput, Manifest  # noqa: E402

SPEC = ImageInput(channels=1, height=32, width=32)


# ---------------------------------------------------------------- the model


def find_or_build_model(models_dir: Path | None, name: str | None, work: Path) -> tuple[Path, str]:
    """A GANomaly-sized 1x32x32 model: the one asked for, a shipped one, or a fresh export
    of `build_model("ganomaly", 1x32x32)` with untrained weights (same graph, same cost)."""
    if models_dir is not None and name is not None:
        return models_dir, name
    shipped = ROOT / "models"
    if shipped.is_dir():
        for manifest in sorted(shipped.glob("*/*/manifest.json")):
            m = Manifest.load(manifest.parent)
            if m.architecture == "ganomaly" and m.input == SPEC:
                return shipped, m.name
    import torch

    from training.models import build_model
    from training.onnx_export import export_onnx, publish

    repo = work / "models"
    torch.manual_seed(0)
    scorer = build_model("ganomaly", SPEC).scorer().eval()
    batch = torch.rand(8, *SPEC.shape)
    onnx_path = work / "bench.onnx"
    rel = export_onnx(scorer, batch, onnx_path)
    with torch.no_grad():
        threshold = float(scorer(batch)[0].median())
    publish(
        repo,
        "bench-ganomaly",
        onnx_path,
        {
            "architecture": "ganomaly",
            "input": SPEC,
            "threshold": {"value": threshold, "rule": "median of 8 random inputs (benchmark)"},
            "provenance": {"dataset": "none", "protocol": "benchmark", "epochs": 0, "seed": 0},
            "onnx": {"opset": 18, "parity_max_rel_diff": rel},
        },
    )
    return repo, "bench-ganomaly"


def latest_dir(models_dir: Path, name: str) -> Path:
    versions = [p for p in (models_dir / name).iterdir() if p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name))


# ---------------------------------------------------------------- raw ONNX Runtime


def raw_onnx_runtime(model_dir: Path, providers: str, seconds: float) -> dict[str, Any]:
    """Images/s of the very session the service builds, at batch 1, 32 and 64."""
    from service.providers import create_session
    from service.settings import Settings

    session, provider = create_session(
        model_dir / MODEL_FILE, Settings(providers=providers), SPEC.shape
    )
    out: dict[str, Any] = {"provider": provider}
    rng = np.random.default_rng(0)
    for batch in (1, 32, 64):
        x = rng.random((batch, *SPEC.shape), dtype=np.float32)
        for _ in range(3):
            session.run(None, {"x": x})
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - t)
        out[f"batch_{batch}"] = {
            "images_per_s": round(batch * len(times) / sum(times), 1),
            "median_batch_ms": round(statistics.median(times) * 1000, 3),
            "runs": len(times),
        }
    return out


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout}s")


class Server:
    def __init__(self, cmd: list[str], ready_path: str, port: int, env: dict[str, str], log: Path):
        self.cmd, self.ready_path, self.port, self.env, self.log = cmd, ready_path, port, env, log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        wait_ready(f"http://127.0.0.1:{self.port}{self.ready_path}", self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def gansentry_server(models_dir: Path, work: Path, **settings: Any) -> Server:
    port = free_port()
    env = {f"GANSENTRY_{k.upper()}": str(v) for k, v in settings.items()}
    cmd = [
        sys.executable, "-m", "gansentry.cli", "serve", "--host", "127.0.0.1",
        "--port", str(port), "--models-dir", str(models_dir), "--log-level", "warning",
    ]  # fmt: skip
    return Server(cmd, "/readyz", port, env, work / "gansentry.log")


def litserve_server(model_dir: Path, work: Path, max_batch_size: int, delay_ms: float) -> Server:
    port = free_port()
    cmd = [
        sys.executable, str(Path(__file__).with_name("litserve_server.py")),
        "--model-dir", str(model_dir),
        "--port", str(port), "--max-batch-size", str(max_batch_size),
        "--batch-timeout-ms", str(delay_ms),
    ]  # fmt: skip
    return Server(cmd, "/health", port, {}, work / "litserve.log")


# ---------------------------------------------------------------- wrk


LUA = """
local f = assert(io.open("{body}", "rb"))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
local pause = {delay_ms}
function delay()
  if pause > 0 then return pause end
  return 0
end
"""


def wrk(
    url: str, body: dict, work: Path, seconds: int, connections: int, delay_ms: float = 0
) -> dict[str, Any]:
    body_path = work / f"body-{len(body['inputs'])}.json"
    body_path.write_text(json.dumps(body))
    script = work / f"post-{delay_ms:g}.lua"
    script.write_text(LUA.format(body=body_path, delay_ms=round(delay_ms, 2)))
    base = ["wrk", "-t1", f"-c{connections}", "--latency", "-s", str(script), url]
    subprocess.run([*base[:2], "-d3s", *base[2:]], capture_output=True, check=True)  # warm-up
    load = os.getloadavg()[0]
    out = subprocess.run(
        [*base[:2], f"-d{seconds}s", *base[2:]], capture_output=True, text=True, check=True
    ).stdout
    return {**parse_wrk(out), "load_avg_1m_before": round(load, 2)}


def parse_wrk(text: str) -> dict[str, Any]:
    def ms(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
        return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    out: dict[str, Any] = {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", text).group(1)),  # type: ignore[union-attr]
    }
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        out[f"p{pct}_ms"] = round(ms(m.group(1)), 2) if m else None
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    out["non_2xx"] = int(bad.group(1)) if bad else 0
    out["socket_errors"] = errors.group(1) if errors else None
    return out


# ---------------------------------------------------------------- the run


def digit_png() -> str:
    """A 28x28 grey image (MNIST's size), so every request pays for a real decode+resize."""
    import io

    from PIL import Image

    pixels = np.random.default_rng(7).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="gansentry-bench-"))
    try:
        models_dir, name = find_or_build_model(args.models_dir, args.model, work)
        model_dir = latest_dir(models_dir, name)
        print(f"model {name} in {model_dir}", flush=True)
        raw = raw_onnx_runtime(model_dir, args.providers, args.raw_seconds)
        print("raw ONNX Runtime:", json.dumps(raw), flush=True)
        image = digit_png()
        one = {"model": name, "inputs": [{"image": image}]}
        many = {"model": name, "inputs": [{"image": image}] * 64}
        common = {"providers": args.providers, "max_queue_items": 8192}
        delay = args.max_batch_delay_ms
        secs, conns = args.seconds, args.connections
        runs: dict[str, Any] = {}

        def record(key: str, result: dict[str, Any]) -> None:
            runs[key] = result
            print(key, json.dumps(result), flush=True)

        with gansentry_server(
            models_dir, work, max_batch_size=32, max_batch_delay_ms=delay, **common
        ) as s:
            url = f"http://127.0.0.1:{s.port}/score"
            record("gansentry_batched_single", wrk(url, one, work, secs, conns))
            peak = runs["gansentry_batched_single"]["requests_per_s"]
            target = peak / 2
            pause = conns / target * 1000
            half = wrk(url, one, work, secs, conns, delay_ms=pause)
            if half["requests_per_s"] > 0:
                pause = max(0.0, pause * half["requests_per_s"] / target)
                half = wrk(url, one, work, secs, conns, delay_ms=pause)
            record("gansentry_half_load_single", {**half, "target_requests_per_s": target})
        with gansentry_server(
            models_dir, work, max_batch_size=1, max_batch_delay_ms=0, **common
        ) as s:
            url = f"http://127.0.0.1:{s.port}/score"
            record("gansentry_unbatched_single", wrk(url, one, work, secs, conns))
        with gansentry_server(
            models_dir, work, max_batch_size=64, max_batch_delay_ms=delay, **common
        ) as s:
            url = f"http://127.0.0.1:{s.port}/score"
            result = wrk(url, many, work, secs, conns)
            result["images_per_s"] = round(result["requests_per_s"] * 64, 1)
            record("gansentry_64_images", result)
        with litserve_server(model_dir, work, 32, delay) as s:
            record(
                "litserve_batched_single",
                wrk(f"http://127.0.0.1:{s.port}/predict", one, work, secs, conns),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summarise(args, name, raw, runs)


def summarise(
    args: argparse.Namespace, name: str, raw: dict[str, Any], runs: dict[str, Any]
) -> dict[str, Any]:
    b1, b32, b64 = (raw[f"batch_{b}"]["images_per_s"] for b in (1, 32, 64))
    batched = runs["gansentry_batched_single"]["requests_per_s"]
    unbatched = runs["gansentry_unbatched_single"]["requests_per_s"]
    many = runs["gansentry_64_images"]["images_per_s"]
    lit = runs["litserve_batched_single"]["requests_per_s"]
    p99 = runs["gansentry_half_load_single"]["p99_ms"]
    p99_limit = args.max_batch_delay_ms + 3 * raw["batch_32"]["median_batch_ms"]
    targets = [
        ("single-image req/s vs raw ORT at batch 32", batched / b32, 0.5, ">= 0.5x"),
        ("batched vs max_batch_size=1", batched / unbatched, 1.3, ">= 1.3x"),
        ("64-image requests: images/s vs raw ORT at batch 64", many / b64, 0.6, ">= 0.6x"),
        ("gansentry vs LitServe, single-image req/s", batched / lit, 1.0, ">= 1.0x (aim 1.3x)"),
        ("p99 at half peak (ms) vs delay + 3 x full-batch time", p99 / p99_limit, None, "<= 1.0x"),
    ]
    checks = []
    for what, ratio, floor, rule in targets:
        met = ratio <= 1.0 if floor is None else ratio >= floor
        checks.append({"target": what, "ratio": round(ratio, 3), "rule": rule, "met": met})
    return {
        "model": name,
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "shared machine; load_avg_1m_before shows other work running at the time",
        },
        "settings": {
            "connections": args.connections,
            "seconds": args.seconds,
            "max_batch_delay_ms": args.max_batch_delay_ms,
            "providers": args.providers,
        },
        "raw_onnx_runtime": raw,
        "p99_limit_ms": round(p99_limit, 2),
        "runs": runs,
        "targets": checks,
        "reference_raw_images_per_s": {"batch_1": b1, "batch_32": b32, "batch_64": b64},
    }


def markdown(result: dict[str, Any]) -> str:
    raw, runs = result["raw_onnx_runtime"], result["runs"]
    s = result["settings"]
    lines = [
        "## Serving throughput (`benchmarks/serve_benchmark.py`)",
        "",
        f"Model `{result['model']}` (GANomaly, 1x32x32), ONNX Runtime on `{raw['provider']}`, "
        f"{result['machine']['cpus']} CPUs shared with other work (1-minute load average before "
        f"each run in the table). Load: `wrk -t1 -c{s['connections']} -d{s['seconds']}s`, one "
        f"28x28 PNG per request (base64 JSON) unless stated; `max_batch_delay_ms` "
        f"{s['max_batch_delay_ms']:g}.",
        "",
        "| raw ONNX Runtime, in process | images/s | median ms per batch |",
        "|---|---:|---:|",
    ]
    for b in (1, 32, 64):
        r = raw[f"batch_{b}"]
        lines.append(f"| batch {b} | {r['images_per_s']:.0f} | {r['median_batch_ms']:.2f} |")
    lines += [
        "",
        "| server run | req/s | images/s | p50 ms | p99 ms | non-2xx | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "gansentry_batched_single": "gansentry, batching (max 32)",
        "gansentry_unbatched_single": "gansentry, max_batch_size=1",
        "gansentry_64_images": "gansentry, 64 images per request (max 64)",
        "gansentry_half_load_single": "gansentry, batching, at half peak rate",
        "litserve_batched_single": "LitServe, batching (max 32), same ONNX session",
    }
    for key, label in labels.items():
        r = runs[key]
        images = r.get("images_per_s", r["requests_per_s"])
        lines.append(
            f"| {label} | {r['requests_per_s']:.0f} | {images:.0f} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['non_2xx']} | {r['load_avg_1m_before']} |"
        )
    lines += ["", "| target (issue 3) | measured | rule | met |", "|---|---:|---|---|"]
    for t in result["targets"]:
        lines.append(
            f"| {t['target']} | {t['ratio']:.2f}x | {t['rule']} | {'yes' if t['met'] else 'no'} |"
        )
    lines += [
        "",
        f"p99 limit = max_batch_delay_ms + 3 x median batch-32 time = {result['p99_limit_ms']} ms.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--model")
    parser.add_argument("--providers", default="cpu", choices=["auto", "tensorrt", "cuda", "cpu"])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--raw-seconds", type=float, default=5.0)
    parser.add_argument("--max-batch-delay-ms", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve.json")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("wrk is not on the PATH (Debian: apt-get install wrk)")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
