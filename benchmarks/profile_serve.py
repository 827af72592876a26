"""Flame graphs of `gansentry serve` under wrk load: where a single-input request's time
goes on the event loop, for JSON (`POST /score`, one PNG) and KServe v2 binary tensors.

Not a test and not run in CI: it needs `wrk` and `py-spy` (dev extra) on the PATH, and
py-spy needs to attach to the server (root, or ptrace allowed).

    python benchmarks/profile_serve.py --label after      # -> docs/profiles/after-{json,v2}.svg

For each protocol it starts wrk (as `serve_benchmark.py` does: `-t1 -c32`, max batch 32),
records py-spy's raw stacks and then a flame graph, and prints the share of the event-loop
thread's samples spent in the frames that matter for per-request cost. The server runs the
code that `python -m gansentry.cli` finds, so an older checkout is profiled with this script
as `PYTHONPATH=OLD_CHECKOUT python NEW_CHECKOUT/benchmarks/profile_serve.py --label before`,
run from outside both checkouts (`python -m` puts the working directory first)."""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import serve_benchmark as sb

from gansentry.manifest import Manifest

PROFILES = sb.ROOT / "docs" / "profiles"
# Frames whose inclusive share of the event loop's samples the summary shows.
FRAMES = (
    "RequestResponseCycle.run_asgi",  # everything the app does, framework included
    "APIRouter.app",  # FastAPI's routing, when the request goes through it
    "solve_dependencies",
    "score",  # the /score handler
    "_infer",  # the v2 handler
    "parse_json",
    "open_image",
    "decode_opened",
    "_inputs",
    "_split",
    "_submit",
    "_result",
    "_answer",
    "Response.__call__",
)


def summary(raw: Path) -> dict[str, float]:
    """Share (%) of the main thread's samples under each of FRAMES."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        if not frames[0].startswith("_run_module_as_main"):  # not the event loop's thread
            continue
        total += int(n)
        names = {re.sub(r" \(.*", "", f) for f in frames}
        for frame in FRAMES:
            if frame in names:
                counts[frame] += int(n)
    return {f: round(100 * counts[f] / max(total, 1), 1) for f in FRAMES} | {"samples": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--label", required=True, help="file names: LABEL-json.svg, LABEL-v2.svg")
    parser.add_argument("--models-dir", type=Path, default=sb.ROOT / "models")
    parser.add_argument("--model", default="mnist-ganomaly")
    parser.add_argument("--seconds", type=int, default=8, help="per recording")
    parser.add_argument("--out", type=Path, default=PROFILES)
    args = parser.parse_args()
    for tool in ("wrk", "py-spy"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not on the PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gansentry-profile-"))
    manifest = Manifest.load(sb.latest_dir(args.models_dir, args.model))
    image, _ = sb.request_png(manifest.input)
    bodies = {
        "json": ("/score", {"model": args.model, "inputs": [{"image": image}]}),
        "v2": (f"/v2/models/{args.model}/infer", sb.v2_binary_body(manifest.input.shape)),
    }
    try:
        with sb.gansentry_server(
            args.models_dir, work, max_batch_size=32, max_batch_delay_ms=2, max_queue_items=8192
        ) as server:
            for kind, (path, body) in bodies.items():
                url = f"http://127.0.0.1:{server.port}{path}"
                sb.wrk(url, body, work, 2, 32)  # writes the lua script, and warms up
                script = next(work.glob(f"post-{'v2-binary' if kind == 'v2' else 'json-1'}-*"))
                load = subprocess.Popen(
                    ["wrk", "-t1", "-c32", f"-d{2 * args.seconds + 6}s", "-s", str(script), url],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                time.sleep(2)
                raw = work / f"{kind}.txt"
                svg = args.out / f"{args.label}-{kind}.svg"
                for fmt, target in (("raw", raw), ("flamegraph", svg)):
                    subprocess.run(
                        ["py-spy", "record", "-p", str(server.pid), "-d", str(args.seconds),
                         "-r", "100", "-f", fmt, "-o", str(target)],
                        check=True, capture_output=True,
                    )  # fmt: skip
                rate = sb.parse_wrk(load.communicate()[0])["requests_per_s"]
                # The title holds the command line, with a temporary path and a pid.
                text = re.sub(
                    r'(id="title"[^>]*>)[^<]*',
                    rf"\g<1>{args.label}-{kind}: py-spy record -r 100 -d {args.seconds}",
                    svg.read_text(),
                    count=1,
                )
                svg.write_text(text)
                result = {
                    "requests_per_s": rate,
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                    "event_loop_share_pct": summary(raw),
                }
                print(f"{args.label}-{kind}", json.dumps(result), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
