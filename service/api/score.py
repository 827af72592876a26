"""POST /score: JSON or multipart in, one scored result per input out, in input order.

The body is parsed straight from bytes by pydantic-core and the answer is serialised
without a response model, because on a couple of cores the per-request overhead, not
ONNX Runtime, decides throughput. Any batching backend works here: the route only knows
the `Batcher` protocol and the status each `BatchingError` carries.

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
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive

from gansentry.preprocessing import array_to_base64_png
from service import metrics
from service.api.errors import error_response
from service.batching.base import Batcher, DeadlineExceeded, Scored
from service.inputs import InputsInvalid, Parsed, Prepared, decode, parse_images, parse_json
from service.registry import LoadedModel, Registry
from service.schemas import ErrorResponse, ScoreRequest, ScoreResponse
from service.security import require_api_key
from service.settings import Settings, available_cpus

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
CLIENT_GONE = 499  # nginx's convention; only ever seen in metrics
DEADLINE_GRACE_S = 0.02
THREAD_OFFLOAD_INPUTS = 8  # decode/encode this many images in a thread, not on the loop
THREAD_DECODE_PIXELS = 1_000_000  # ... or images this large in all (~5 ms of decoding)
DECODE_THREADS = max(1, available_cpus() // 2)
DECODE_NICE = 10


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
JSON_TYPE, MULTIPART_TYPE = "application/json", "multipart/form-data"

log = logging.getLogger(__name__)

T = TypeVar("T")

# No FastAPI dependencies or query parameters on this route: resolving them costs more
# per request than the rest of the route; the key check and parsing happen inline.
router = APIRouter()

_MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "image": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "one or more PNG/JPEG files (curl -F image=@part.png)",
        }
    },
    "required": ["image"],
}


class MultipartQuery(BaseModel):
    """Query parameters of a multipart upload; a JSON request puts them in its body."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    version: int | None = Field(None, ge=1)
    return_reconstruction: bool = False


_MULTIPART_ONLY = (
    "multipart uploads only (a JSON request names these in its body, and one with query "
    "parameters gets 422)"
)


def _query(name: str, schema: dict, description: str) -> dict:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _errors(*codes: int) -> dict[int | str, dict]:
    return {code: {"model": ErrorResponse} for code in codes}


@router.post(
    "/score",
    summary="Score inputs with a model",
    response_model=None,
    responses={
        200: {"model": ScoreResponse},
        **_errors(400, 401, 404, 413, 415, 422, 500, 503, 504),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}},
                "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            },
        },
        "parameters": [
            _query("model", {"type": "string"}, f"{_MULTIPART_ONLY}: the model name"),
            _query("version", {"type": "integer", "minimum": 1}, _MULTIPART_ONLY),
            _query("return_reconstruction", {"type": "boolean"}, _MULTIPART_ONLY),
        ],
        "security": [{"APIKeyHeader": []}],
    },
)
async def score(request: Request) -> Response:
    """JSON: `{"model", "version"?, "inputs": [{"image"} | {"array"} | {"record"}],
    "return_reconstruction"?, "timeout_ms"?}`. Multipart: `?model=NAME` with one or more
    `image` file fields. A bad input fails its whole request with a 422 naming it; inputs
    past `max_inputs_per_request`, or images past `max_request_pixels` in all, are refused
    with 413. Content types are matched as media types (case-insensitive, parameters
    allowed); a body without one is read as JSON."""
    started = time.perf_counter()
    arrived = time.monotonic()
    metrics.IN_FLIGHT.inc()
    label, status = "unknown", 500
    try:
        app = request.app
        settings: Settings = app.state.settings
        registry: Registry = app.state.registry
        batcher: Batcher = app.state.batcher
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        try:
            if settings.keys:
                await require_api_key(request)
            if media == MULTIPART_TYPE:
                if "model" not in request.query_params:
                    raise HTTPException(422, "multipart uploads need ?model=NAME in the URL")
                query = MultipartQuery.model_validate(dict(request.query_params))
                loaded = registry.get(query.model, query.version)
                label = query.model
                timeout_s = _timeout_s(request, None, settings)
                parsed = await _multipart(request, loaded, settings)
                want_recon = query.return_reconstruction
            elif media == JSON_TYPE or not media:
                if request.query_params:
                    raise HTTPException(
                        422,
                        "query parameters apply to multipart uploads only; a JSON request "
                        "names its model, version and options in the body, got "
                        f"?{', ?'.join(sorted(set(request.query_params)))}",
                    )
                body = ScoreRequest.model_validate_json(await request.body())
                loaded = registry.get(body.model, body.version)
                label = body.model
                _check_count(len(body.inputs), settings)
                timeout_s = _timeout_s(request, body.timeout_ms, settings)
                parsed = await _offload(
                    len(body.inputs) >= THREAD_OFFLOAD_INPUTS,
                    parse_json,
                    body.inputs,
                    loaded.manifest,
                    settings.max_image_pixels,
                    settings.max_request_pixels,
                )
                want_recon = body.return_reconstruction
            else:
                raise HTTPException(
                    415, f"send application/json or multipart/form-data, not {ctype[:100]!r}"
                )
            deadline = arrived + timeout_s
            prepared = await _decode(parsed, deadline, timeout_s)
            scored = await _submit(
                request, batcher, loaded, prepared, deadline, timeout_s, want_recon
            )
            if scored is None:
                status = CLIENT_GONE
                return Response(status_code=CLIENT_GONE)
            payload = await _offload(
                want_recon and len(prepared.kinds) >= THREAD_OFFLOAD_INPUTS,
                _payload,
                loaded,
                prepared,
                scored,
                want_recon,
            )
            # allow_nan=False: an answer is valid JSON or not sent (_payload refuses NaN).
            content = json.dumps(payload, allow_nan=False)
        except Exception as e:
            answer = error_response(e)
            if answer is None:
                # A bug, not the client's fault. Answered here rather than re-raised, so the
                # keep-alive connection stays usable; the traceback goes to the log only.
                log.exception("scoring request failed")
                answer = JSONResponse(
                    {"detail": "internal error while scoring; the server log has the details"},
                    status_code=500,
                )
            status = answer.status_code
            return answer
        status = 200
        return Response(content, media_type="application/json")
    finally:
        metrics.IN_FLIGHT.dec()
        code = str(status)
        metrics.REQUESTS.labels(label, code).inc()
        metrics.REQUEST_LATENCY.labels(label, code).observe(time.perf_counter() - started)


def _check_count(n: int, settings: Settings) -> None:
    if n > settings.max_inputs_per_request:
        raise HTTPException(
            413,
            f"{n} inputs is over the limit of {settings.max_inputs_per_request} per request; "
            "split them across requests",
        )


async def _multipart(request: Request, loaded: LoadedModel, settings: Settings) -> Parsed:
    limit = settings.max_inputs_per_request
    try:
        form = await request.form(max_files=limit, max_fields=limit)
    except StarletteHTTPException as e:  # what Request.form raises, FastAPI's base class
        if e.status_code == 400 and "Too many" in str(e.detail):
            raise HTTPException(
                413, f"more than {limit} multipart fields; the limit is {limit} inputs per request"
            ) from None
        raise
    try:
        images: list[bytes] = []
        for key, value in form.multi_items():
            if key != "image":
                raise HTTPException(
                    422, f"unexpected multipart field {key!r}; send files as 'image' fields"
                )
            if not isinstance(value, UploadFile):
                raise HTTPException(422, f"inputs[{len(images)}]: 'image' must be a file upload")
            images.append(await value.read())
    finally:
        await form.close()
    if not images:
        raise HTTPException(422, "no 'image' file fields in the multipart body")
    _check_count(len(images), settings)
    return await _offload(
        len(images) >= THREAD_OFFLOAD_INPUTS,
        parse_images,
        images,
        loaded.manifest,
        settings.max_image_pixels,
        settings.max_request_pixels,
    )


def _timeout_s(request: Request, body_ms: float | None, settings: Settings) -> float:
    limit = settings.request_timeout_ms
    ms = body_ms
    header = request.headers.get(TIMEOUT_HEADER)
    if ms is None and header is not None:
        try:
            ms = float(header)
        except ValueError:
            ms = -1.0
        if not ms > 0:
            raise HTTPException(422, f"{TIMEOUT_HEADER} must be a positive number of milliseconds")
    return min(ms or limit, limit) / 1000.0


async def _submit(
    request: Request,
    batcher: Batcher,
    loaded: LoadedModel,
    prepared: Prepared,
    deadline: float,
    timeout_s: float,
    want_recon: bool,
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
            loaded.ref, prepared.x, time.time() + left_s, reconstruction=want_recon
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


async def _offload(in_thread: bool, fn: Callable[..., T], *args: object) -> T:
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
        return await _offload(len(parsed.images) >= THREAD_OFFLOAD_INPUTS, decode, parsed, deadline)
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


def _payload(loaded: LoadedModel, prepared: Prepared, scored: Scored, want_recon: bool) -> dict:
    threshold = loaded.threshold
    name = loaded.ref.name
    recons = scored.reconstructions
    _refuse_nonfinite(name, scored.scores, recons if want_recon else None)
    scores = scored.scores.tolist()
    results: list[dict] = []
    for i, s in enumerate(scores):
        result: dict = {"score": s, "is_anomaly": s > threshold}
        reason = prepared.reasons.get(i)
        if reason is not None:  # the model's unknown_policy is `anomaly`
            result["is_anomaly"], result["reason"] = True, reason
        if want_recon:
            assert recons is not None, "asked the batcher for reconstructions"
            recon = recons[i]
            result["reconstruction"] = (
                array_to_base64_png(recon) if prepared.kinds[i] == "image" else recon.tolist()
            )
        results.append(result)
    anomalies = sum(1 for r in results if r["is_anomaly"])
    metrics.INPUTS.labels(name).inc(len(scores))
    if anomalies:
        metrics.ANOMALIES.labels(name).inc(anomalies)
    if threshold > 0:
        ratio = metrics.SCORE_RATIO.labels(name)
        for s in scores:
            ratio.observe(s / threshold)
    return {
        "model": name,
        "version": loaded.ref.version,
        "threshold": threshold,
        "results": results,
    }


def _refuse_nonfinite(name: str, scores: np.ndarray, recons: np.ndarray | None) -> None:
    bad = ~np.isfinite(scores)
    if recons is not None:
        bad |= ~np.isfinite(recons.reshape(len(recons), -1)).all(axis=1)
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
