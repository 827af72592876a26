"""Garbage-collector settings for a long-running serving process.

Timed with `gc.callbacks` in a `gansentry serve` process under wrk load (2 cores): with
Python's defaults a full collection ran about once a second and walked every object
FastAPI, pydantic, NumPy and ONNX Runtime built at start-up, stalling the event loop
40-60 ms each time, which was the whole p99 tail. Freezing what start-up built takes it
out of every later collection, and a larger young generation lets in-flight requests'
objects die young instead of being promoted and rescanned. The p99 that results is in
docs/benchmarks.md (`benchmarks/serve_benchmark.py`)."""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000
OLDER_THRESHOLDS = (20, 20)


def settle_after_startup() -> None:
    """Call once the models are loaded, before taking traffic."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
