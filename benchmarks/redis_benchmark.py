"""Redis path vs embedded path, on one machine, with wrk as the load generator.

    python benchmarks/redis_benchmark.py [--duration 10] [--connections 32]

Measures, for one compute-bound model (a GANomaly of the paper's size, 64 base filters, on
3x64x64 images, untrained: serving does not care about the weights) and the same batch
settings on both paths:
- throughput of `gansentry serve` (embedded batcher) vs `gansentry serve --redis-url` + one
  `gansentry worker`;
- scale-out: one vs two workers, each with ONNX Runtime limited to 1 intra-op thread;
- the p50 latency the Redis hop adds, at one request in flight.

Writes benchmarks/results/redis.json; `benchmarks/write_docs.py` renders it. Not part of
CI: it takes a few minutes and wants the machine to itself."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures_redis import ApiProcess, RedisServer, WorkerProcess  # noqa: E402

MODEL = "bench-ganomaly"
WIDTH = 64  # the paper's base filter count; compute per image dwarfs the queue's overhead
BATCH = {"max_batch_size": 32, "max_batch_delay_ms": 2}


def build_model(models_dir: Path) -> None:
    import torch

    from gansentry.contract import EXPORT_OPSET
    from gansentry.manifest import ImageInput
    from training.models import build_model as build
    from training.onnx_export import export_onnx, publish

    spec = ImageInput(channels=3, height=64, width=64)
    torch.manual_seed(0)
    scorer = build("ganomaly", spec, width=WIDTH).scorer().eval()
    batch = torch.rand(4, 3, 64, 64)
    onnx_path = models_dir / ".bench.onnx"
    models_dir.mkdir(parents=True, exist_ok=True)
    rel = export_onnx(scorer, batch, onnx_path)
    publish(
        models_dir,
        MODEL,
        onnx_path,
        {
            "architecture": "ganomaly",
            "input": spec,
            "threshold": {"value": 1.0, "rule": "benchmark: arbitrary"},
            "provenance": {"dataset": "none", "protocol": "untrained", "epochs": 0, "seed": 0},
            "onnx": {"opset": EXPORT_OPSET, "parity_max_rel_diff": rel},
        },
    )
    onnx_path.unlink()


def ort_timings(models_dir: Path) -> dict[str, float]:
    """Milliseconds per ORT call at 1 intra-op thread, for context."""
    from service.registry import Registry
    from service.settings import Settings

    settings = Settings(models_dir=models_dir, providers="cpu", intra_op_threads=1)
    model = Registry(models_dir, settings).load().get(MODEL)
    out = {}
    for n in (1, 8, 32):
        x = np.random.default_rng(0).random((n, 3, 64, 64), dtype=np.float32)
        model.run(x)
        started = time.perf_counter()
        reps = max(3, 64 // n)
        for _ in range(reps):
            model.run(x)
        out[f"batch_{n}_ms"] = round((time.perf_counter() - started) / reps * 1000, 3)
    return out


def request_body(images: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    inputs = []
    for _ in range(images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        inputs.append({"image": base64.b64encode(buf.getvalue()).decode()})
    return json.dumps({"model": MODEL, "inputs": inputs})


def write_lua(path: Path, body: str) -> None:
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(body)}\n"
    )


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, lua: Path, connections: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(lua),
            f"{url}/score",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "%" not in out:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s*(50|75|90|99)%\s+([\d.]+(?:us|ms|s))", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    return {
        "requests_per_s": rps,
        "p50_ms": _ms(lat["50"]),
        "p90_ms": _ms(lat["90"]),
        "p99_ms": _ms(lat["99"]),
        "requests": int(total.group(1)) if total else 0,
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU-seconds all processes on the machine have used (every core, /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def scenario(
    name: str,
    models: Path,
    work: Path,
    lua: Path,
    connections: int,
    seconds: float,
    workers: int | None,
) -> dict[str, object]:
    """workers=None: embedded batcher; else that many Redis workers."""
    redis = api = None
    procs: list[WorkerProcess] = []
    try:
        settings: dict[str, object] = {**BATCH, "intra_op_threads": 1}
        if workers is not None:
            redis = RedisServer(work / f"redis-{name}").start()
            procs = [
                WorkerProcess(redis.url, models, f"{name}-w{i}", work, **settings)
                for i in range(workers)
            ]
            for w in procs:
                w.wait_alive()
            settings["redis_url"] = redis.url
        api = ApiProcess(models, work, **settings).wait_up()
        api.wait_ready()
        wrk(api.url, lua, connections, 2)  # warm-up
        pids = {"api": api.process.pid, **{w.name: w.process.pid for w in procs}}
        if redis is not None and redis.process is not None:
            pids["redis"] = redis.process.pid
        cpu_before = {k: cpu_seconds(p) for k, p in pids.items()}
        busy_before, wall_before = machine_busy_seconds(), time.monotonic()
        result: dict[str, object] = dict(wrk(api.url, lua, connections, seconds))
        wall = time.monotonic() - wall_before
        cpu = {k: round(cpu_seconds(p) - cpu_before[k], 2) for k, p in pids.items()}
        busy = machine_busy_seconds() - busy_before
        result["cpu_seconds"] = cpu
        # the cores' capacity over the run, and what everything else on the machine
        # (wrk, other users) took of it
        result["machine_cpu_capacity_s"] = round(wall * (os.cpu_count() or 1), 2)
        result["machine_cpu_busy_s"] = round(busy, 2)
        result["other_processes_cpu_s"] = round(busy - sum(cpu.values()), 2)
        if procs:
            items = sum(w.metric("gansentry_batch_size_sum") for w in procs)
            calls = sum(w.metric("gansentry_batch_size_count") for w in procs)
            result["mean_batch"] = round(items / calls, 2) if calls else 0.0
            result["items_per_worker"] = [w.metric("gansentry_batch_size_sum") for w in procs]
        print(f"{name:>24}: {json.dumps(result)}", flush=True)
        return {"name": name, "connections": connections, "workers": workers, **result}
    finally:
        if api is not None:
            api.stop()
        for w in procs:
            w.stop()
        if redis is not None:
            redis.stop()


LABELS = {
    "embedded": "embedded batcher, 32 connections",
    "redis_1_worker": "Redis + 1 worker, 32 connections",
    "redis_2_workers": "Redis + 2 workers, 32 connections",
    "embedded_latency": "embedded batcher, 1 connection",
    "redis_latency": "Redis + 1 worker, 1 connection",
}


def markdown(report: dict) -> str:
    """The Redis section of docs/benchmarks.md, from redis.json."""
    lines = [
        "## Redis path vs embedded path (`benchmarks/redis_benchmark.py`)",
        "",
        f"Model: {report['model']}. Requests: {report['request']}. Batching: "
        f"{report['batch_settings']}. Load: {report['load']}. Load average at the end: "
        f"{', '.join(f'{v:.2f}' for v in report['machine']['load_average_at_end'])}.",
        "",
        "| run | requests/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for key, label in LABELS.items():
        m = report["medians"][key]
        lines.append(
            f"| {label} | {m['requests_per_s']:.1f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} |"
        )
    lines += ["", "| target (issue 4) | measured | rule |", "|---|---:|---|"]
    for key, rule in report["targets"].items():
        lines.append(f"| {key.replace('_', ' ')} | {report['summary'][key]} | {rule} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats")
    parser.add_argument("--images", type=int, default=4, help="images per request")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/redis.json")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gansentry-redis-bench-"))
    models = work / "models"
    build_model(models)
    lua = work / "post.lua"
    write_lua(lua, request_body(args.images))
    c, d = args.connections, args.duration
    plan = {
        "embedded": (c, None),
        "redis_1_worker": (c, 1),
        "redis_2_workers": (c, 2),
        "embedded_latency": (1, None),
        "redis_latency": (1, 1),
    }
    # Interleaved rounds, medians reported: on a shared machine the load from other
    # processes drifts within minutes, and back-to-back runs of one path would absorb it.
    runs = [
        scenario(name, models, work, lua, conns, d, w)
        for _ in range(args.rounds)
        for name, (conns, w) in plan.items()
    ]
    by = {
        name: {
            key: statistics.median(float(r[key]) for r in runs if r["name"] == name)  # type: ignore[arg-type]
            for key in ("requests_per_s", "p50_ms", "p99_ms")
        }
        for name in plan
    }
    summary = {
        "redis_vs_embedded_throughput": round(
            by["redis_1_worker"]["requests_per_s"] / by["embedded"]["requests_per_s"], 3
        ),
        "two_vs_one_worker_throughput": round(
            by["redis_2_workers"]["requests_per_s"] / by["redis_1_worker"]["requests_per_s"], 3
        ),
        "redis_added_p50_ms": round(
            by["redis_latency"]["p50_ms"] - by["embedded_latency"]["p50_ms"], 3
        ),
    }
    report = {
        "model": f"{MODEL}: untrained GANomaly, 3x64x64, {WIDTH} base filters, ONNX Runtime "
        "CPU, 1 intra-op thread",
        "request": f"{args.images} base64 PNG image(s) per POST /score",
        "batch_settings": BATCH,
        "load": f"wrk -t1, {c} connections (1 for the latency runs), {d:g} s after a 2 s "
        f"warm-up, {args.rounds} interleaved rounds, medians",
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(),
        },
        "ort_ms_per_call": ort_timings(models),
        "medians": by,
        "runs": runs,
        "summary": summary,
        "targets": {
            "redis_vs_embedded_throughput": ">= 0.8",
            "two_vs_one_worker_throughput": ">= 1.6",
            "redis_added_p50_ms": "<= 2",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
