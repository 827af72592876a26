"""The one scoring path behind every protocol (`POST /score`, the KServe v2 `infer`):
resolve the model, bound the request, decode within its deadline, submit with client
disconnect handling, check and count the results. A protocol adapter parses its own wire
format into a `Parsed` batch (service/inputs.py) and writes `Result` back in its own;
everything between is here, so the protocols cannot drift apart in deadlines, limits,
refusals or metrics.

The request's deadline starts when it arrives and covers everything after: reading the
body, decoding images (checked between images, in a worker thread when there are many
pixels, so other requests keep being served) and the batcher's wait.

A score that comes out NaN or Inf is never answered: JSON has no NaN, and "not an
anomaly" would be a way past the detector. The request fails with a 422 naming the
input (its values lie where the model was not trained), and
`gansentry_nonfinite_scores_total` counts it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from fastapi import HTTPException, Request
from starlette.types import Receive

from gansentry.manifest import ImageInput
from service import metrics
from service.batching.base import Batcher, DeadlineExceeded, InferenceFailed, Scored
from service.inputs import InputsInvalid, Parsed, Prepared, decode, parse_images
from service.registry import LoadedModel, Registry
from service.security import require_api_key
from service.settings import Settings, available_cpus

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
CLIENT_GONE = 499  # nginx's convention; only ever seen in metrics
DEADLINE_GRACE_S = 0.02
THREAD_OFFLOAD_INPUTS = 8  # decode/encode this many images in a thread, not on the loop
THREAD_DECODE_PIXELS = 1_000_000  # ... or images this large in all (~5 ms of decoding)
DECODE_THREADS = max(1, available_cpus() // 2)
DECODE_NICE = 10

log = logging.getLogger(__name__)

T = TypeVar("T")


def _lower_priority() -> None:
    """Linux schedules threads one by one: a decode thread at a lower priority gives way
    to the event loop and ONNX Runtime whenever they have work."""
    with contextlib.suppress(AttributeError, OSError):  # elsewhere: the same priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)


# Requests with that many pixels decode in this pool, at most half the CPUs at once and at
# a lower priority, so that huge images leave CPU to the other requests.
DECODE_POOL = ThreadPoolExecutor(
    DECODE_THREADS, thread_name_prefix="gansentry-decode", initializer=_lower_priority
)


@dataclass
class Call:
    """One scoring request from arrival to answer, whatever protocol carries it. The
    adapter sets `label` once it knows the model and `status` before answering; `observed`
    records both."""

    request: Request
    settings: Settings
    registry: Registry
    batcher: Batcher
    arrived: float  # time.monotonic() at arrival: the deadline counts from here
    label: str = "unknown"
    status: int = 500

    async def authorize(self) -> None:
        if self.settings.keys:
            await require_api_key(self.request)

    def model(self, name: str, version: int | None) -> LoadedModel:
        """The served version (404 when unknown); from here on metrics name the model."""
        loaded = self.registry.get(name, version)
        self.label = name
        return loaded

    def check_count(self, n: int) -> None:
        limit = self.settings.max_inputs_per_request
        if n > limit:
            over = f"{n} inputs is over the limit of {limit} per request"
            raise HTTPException(413, f"{over}; split them across requests")

    def timeout_s(self, requested_ms: float | None) -> float:
        """The request's allowance: `requested_ms` (from the body) or the timeout header,
        capped by `request_timeout_ms`."""
        limit = self.settings.request_timeout_ms
        ms = requested_ms
        header = self.request.headers.get(TIMEOUT_HEADER)
        if ms is None and header is not None:
            try:
                ms = float(header)
            except ValueError:
                ms = -1.0
            if not ms > 0:
                raise HTTPException(
                    422, f"{TIMEOUT_HEADER} must be a positive number of milliseconds"
                )
        return min(ms or limit, limit) / 1000.0

    async def parse_images(self, loaded: LoadedModel, images: list[bytes]) -> Parsed:
        """Encoded image files (a multipart upload, a v2 BYTES tensor), counted against
        the request's limits; their headers are read, their pixels not yet decoded."""
        self.check_count(len(images))
        settings = self.settings
        return await offload(
            len(images) >= THREAD_OFFLOAD_INPUTS,
            parse_images,
            images,
            loaded.manifest,
            settings.max_image_pixels,
            settings.max_request_pixels,
        )

    async def score(
        self,
        loaded: LoadedModel,
        parsed: Parsed,
        timeout_s: float,
        reconstruction: bool,
        anomaly_map: bool = False,
    ) -> Result | None:
        """Decode, batch and check one request. None: the client hung up."""
        if reconstruction:
            check_reconstruction(loaded)
        if anomaly_map:
            check_anomaly_map(loaded)
        deadline = self.arrived + timeout_s
        prepared = await _decode(parsed, deadline, timeout_s)
        scored = await _submit(
            self.request,
            self.batcher,
            loaded,
            prepared,
            deadline,
            timeout_s,
            reconstruction,
            anomaly_map,
        )
        if scored is None:
            self.status = CLIENT_GONE
            return None
        return _result(loaded, prepared, scored, reconstruction, anomaly_map)


def check_reconstruction(loaded: LoadedModel) -> None:
    """422 for a request that asks a model that does not reconstruct its input (its
    manifest's `outputs` lack `reconstruction`) for reconstructions."""
    if not loaded.has_reconstruction:
        ref = loaded.ref
        raise HTTPException(
            422,
            f"model {ref.name} version {ref.version} has no reconstructions: its graph "
            f"outputs only {', '.join(loaded.manifest.outputs)}",
        )


def check_anomaly_map(loaded: LoadedModel) -> None:
    """422 for a request that asks a model without anomaly maps for one, saying why and
    how to get them."""
    if loaded.has_anomaly_map:
        return
    ref = loaded.ref
    if not isinstance(loaded.manifest.input, ImageInput):
        raise HTTPException(
            422,
            f"model {ref.name} version {ref.version} takes records or feature arrays; "
            "anomaly maps are for image models only",
        )
    if not loaded.has_reconstruction:
        raise HTTPException(
            422,
            f"model {ref.name} version {ref.version} has no reconstructions, so no anomaly "
            "maps (a map is the difference between an input and its reconstruction)",
        )
    raise HTTPException(
        422,
        f"model {ref.name} version {ref.version} has no anomaly maps; publish a version with "
        f"them with `gansentry add-anomaly-map models/{ref.name}/{ref.version}`",
    )


def begin(request: Request) -> Call:
    state = request.app.state
    return Call(request, state.settings, state.registry, state.batcher, time.monotonic())


@contextlib.contextmanager
def observed(call: Call) -> Iterator[Call]:
    """Counts the request in flight, then by model and status, with its latency."""
    started = time.perf_counter()
    metrics.IN_FLIGHT.inc()
    try:
        yield call
    finally:
        metrics.IN_FLIGHT.dec()
        code = str(call.status)
        metrics.REQUESTS.labels(call.label, code).inc()
        metrics.REQUEST_LATENCY.labels(call.label, code).observe(time.perf_counter() - started)


@dataclass(frozen=True)
class Result:
    loaded: LoadedModel
    kinds: list[str]  # per input: "image", "array" or "record"
    scores: list[float]  # all finite
    score_array: np.ndarray  # the same, float32 [n]
    is_anomaly: list[bool]
    reasons: dict[int, str]  # input index -> why the model's `anomaly` policy flags it
    reconstructions: np.ndarray | None  # float32 [n, *sample_shape], all finite; if asked
    anomaly_maps: np.ndarray | None = None  # float32 [n, H, W], all finite; if asked


async def offload(in_thread: bool, fn: Callable[..., T], *args: object) -> T:
    """Image decoding and PNG encoding release the GIL: big requests go to a thread so the
    event loop keeps accepting others; small ones stay inline, where a hop costs more."""
    if in_thread:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def _decode(parsed: Parsed, deadline: float, timeout_s: float) -> Prepared:
    """Small images decode inline, many small ones in a thread; large ones in the bounded
    decode pool, waited for only until the deadline. A request whose turn comes after its
    deadline stops before its first image, so a flood of huge images holds at most
    DECODE_THREADS cores, and each is answered by its deadline plus one image's decoding."""
    if parsed.pixels < THREAD_DECODE_PIXELS:
        return await offload(len(parsed.images) >= THREAD_OFFLOAD_INPUTS, decode, parsed, deadline)
    future = asyncio.get_running_loop().run_in_executor(DECODE_POOL, decode, parsed, deadline)
    # Its outcome is not wanted once the deadline passed; retrieve it so it is not logged.
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        return await asyncio.wait_for(
            asyncio.shield(future), max(0.0, deadline - time.monotonic()) + DEADLINE_GRACE_S
        )
    except asyncio.TimeoutError:
        raise DeadlineExceeded(
            f"the request's deadline of {timeout_s * 1000:g} ms passed before its images "
            "were decoded"
        ) from None


async def _submit(
    request: Request,
    batcher: Batcher,
    loaded: LoadedModel,
    prepared: Prepared,
    deadline: float,
    timeout_s: float,
    want_recon: bool,
    want_map: bool = False,
) -> Scored | None:
    """Wait for the batcher until the deadline (`time.monotonic()`; `timeout_s` is the
    request's whole allowance, for the message) or the client hanging up, whichever comes
    first; either cancels the wait, so the request's inputs leave the queue. None: the
    client is gone. (Cancelling this task costs less than racing a second one.)"""
    left_s = deadline - time.monotonic()
    if left_s <= 0:
        raise DeadlineExceeded(
            f"the request's deadline of {timeout_s * 1000:g} ms passed before it was queued"
        )
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    why: list[str] = []

    def stop(reason: str) -> None:
        if not why:
            why.append(reason)
            task.cancel()

    # The backend enforces the deadline itself (and counts what expired); this timer is
    # the safety net for a backend that does not answer at all.
    timer = loop.call_later(left_s + DEADLINE_GRACE_S, stop, "deadline")
    watch = loop.create_task(_on_disconnect(request.receive, stop))
    try:
        return await batcher.submit(
            loaded.ref,
            prepared.x,
            time.time() + left_s,
            reconstruction=want_recon,
            anomaly_map=want_map,
        )
    except asyncio.CancelledError:
        if not why:
            raise
        if hasattr(task, "uncancel"):
            task.uncancel()
        if why[0] == "client":
            return None
        raise DeadlineExceeded(
            f"no result within the request's deadline of {timeout_s * 1000:g} ms"
        ) from None
    finally:
        timer.cancel()
        watch.cancel()


async def _on_disconnect(receive: Receive, stop: Callable[[str], None]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    stop("client")


def _result(
    loaded: LoadedModel, prepared: Prepared, scored: Scored, want_recon: bool, want_map: bool
) -> Result:
    threshold = loaded.threshold
    name = loaded.ref.name
    recons = scored.reconstructions if want_recon else None
    maps = scored.anomaly_maps if want_map else None
    if want_map and maps is None:
        # Through Redis: the worker's copy of this version has no anomaly_map output.
        raise InferenceFailed(
            f"the worker that computed {loaded.ref.key} has no anomaly maps for it; its model "
            "repository differs from this API's"
        )
    if want_recon and recons is None:
        # Through Redis: the worker's copy of this version has no reconstruction output.
        raise InferenceFailed(
            f"the worker that computed {loaded.ref.key} has no reconstructions for it; its "
            "model repository differs from this API's"
        )
    _refuse_nonfinite(name, scored.scores, recons, maps)
    scores = scored.scores.tolist()
    flagged = [s > threshold for s in scores]
    for i in prepared.reasons:  # the model's unknown_policy is `anomaly`
        flagged[i] = True
    metrics.INPUTS.labels(name).inc(len(scores))
    anomalies = sum(flagged)
    if anomalies:
        metrics.ANOMALIES.labels(name).inc(anomalies)
    if threshold > 0:
        ratio = metrics.SCORE_RATIO.labels(name)
        for s in scores:
            ratio.observe(s / threshold)
    return Result(
        loaded, prepared.kinds, scores, scored.scores, flagged, prepared.reasons, recons, maps
    )


def _refuse_nonfinite(
    name: str, scores: np.ndarray, recons: np.ndarray | None, maps: np.ndarray | None = None
) -> None:
    bad = ~np.isfinite(scores)
    for extra in (recons, maps):
        if extra is not None:
            bad |= ~np.isfinite(extra.reshape(len(extra), -1)).all(axis=1)
    if not bad.any():
        return
    where = np.flatnonzero(bad).tolist()
    metrics.NONFINITE_SCORES.labels(name).inc(len(where))
    log.warning("model %s gave a NaN or Inf score for %d input(s)", name, len(where))
    raise InputsInvalid(
        [
            f"inputs[{i}]: the model's score for this input is not a finite number (NaN or "
            "Inf): its values lie far outside what the model was trained on"
            for i in where
        ]
    )
