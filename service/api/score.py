"""POST /score: JSON or multipart in, one scored result per input out, in input order.

The body is parsed straight from bytes by pydantic-core and the answer is serialised
without a response model, because on a couple of cores the per-request overhead, not
ONNX Runtime, decides throughput. Any batching backend works here: the route only knows
the `Batcher` protocol and the status each `BatchingError` carries."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TypeVar

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive

from gansentry.preprocessing import array_to_base64_png
from service import metrics
from service.api.errors import error_response
from service.batching.base import Batcher, DeadlineExceeded, Scored
from service.inputs import Prepared, prepare_images, prepare_json
from service.registry import LoadedModel, Registry
from service.schemas import ErrorResponse, ScoreRequest, ScoreResponse
from service.security import require_api_key
from service.settings import Settings

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
CLIENT_GONE = 499  # nginx's convention; only ever seen in metrics
DEADLINE_GRACE_S = 0.02
THREAD_OFFLOAD_INPUTS = 8  # decode/encode this many images in a thread, not on the loop

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
    model: str
    version: int | None = Field(None, ge=1)
    return_reconstruction: bool = False


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
    responses={200: {"model": ScoreResponse}, **_errors(401, 404, 413, 415, 422, 503, 504)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}},
                "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            },
        },
        "parameters": [
            _query("model", {"type": "string"}, "multipart only: the model name"),
            _query("version", {"type": "integer", "minimum": 1}, "multipart only: default latest"),
            _query("return_reconstruction", {"type": "boolean"}, "multipart only"),
        ],
        "security": [{"APIKeyHeader": []}],
    },
)
async def score(request: Request) -> Response:
    """JSON: `{"model", "version"?, "inputs": [{"image"} | {"array"} | {"record"}],
    "return_reconstruction"?, "timeout_ms"?}`. Multipart: `?model=NAME` with one or more
    `image` file fields. A bad input fails its whole request with a 422 naming it; inputs
    past `max_inputs_per_request` are refused with 413."""
    started = time.perf_counter()
    metrics.IN_FLIGHT.inc()
    label, status = "unknown", 500
    try:
        app = request.app
        settings: Settings = app.state.settings
        registry: Registry = app.state.registry
        batcher: Batcher = app.state.batcher
        ctype = request.headers.get("content-type", "")
        try:
            if settings.keys:
                await require_api_key(request)
            if ctype.startswith("multipart/form-data"):
                if "model" not in request.query_params:
                    raise HTTPException(422, "multipart uploads need ?model=NAME in the URL")
                query = MultipartQuery.model_validate(request.query_params)
                loaded = registry.get(query.model, query.version)
                label = query.model
                prepared, timeout_ms = await _multipart(request, loaded, settings), None
                want_recon = query.return_reconstruction
            elif ctype.startswith("application/json") or not ctype:
                body = ScoreRequest.model_validate_json(await request.body())
                loaded = registry.get(body.model, body.version)
                label = body.model
                _check_count(len(body.inputs), settings)
                prepared = await _offload(
                    len(body.inputs),
                    prepare_json,
                    body.inputs,
                    loaded.manifest,
                    settings.max_image_pixels,
                )
                timeout_ms, want_recon = body.timeout_ms, body.return_reconstruction
            else:
                raise HTTPException(
                    415, f"send application/json or multipart/form-data, not {ctype!r}"
                )
            timeout_s = _timeout_s(request, timeout_ms, settings)
            scored = await _submit(request, batcher, loaded, prepared, timeout_s, want_recon)
            if scored is None:
                status = CLIENT_GONE
                return Response(status_code=CLIENT_GONE)
            payload = await _offload(
                len(prepared.kinds) if want_recon else 0,
                _payload,
                loaded,
                prepared,
                scored,
                want_recon,
            )
        except Exception as e:
            answer = error_response(e)
            if answer is None:
                raise
            status = answer.status_code
            return answer
        status = 200
        return Response(json.dumps(payload), media_type="application/json")
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


async def _multipart(request: Request, loaded: LoadedModel, settings: Settings) -> Prepared:
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
        len(images), prepare_images, images, loaded.manifest, settings.max_image_pixels
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
    timeout_s: float,
    want_recon: bool,
) -> Scored | None:
    """Wait for the batcher until the deadline or the client hanging up, whichever comes
    first; either cancels the wait, so the request's inputs leave the queue. None: the
    client is gone. (Cancelling this task costs less than racing a second one.)"""
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
    timer = loop.call_later(timeout_s + DEADLINE_GRACE_S, stop, "deadline")
    watch = loop.create_task(_on_disconnect(request.receive, stop))
    try:
        return await batcher.submit(
            loaded.ref, prepared.x, time.time() + timeout_s, reconstruction=want_recon
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


async def _offload(n: int, fn: Callable[..., T], *args: object) -> T:
    """Image decoding and PNG encoding release the GIL: big requests go to a thread so the
    event loop keeps accepting others; small ones stay inline, where a hop costs more."""
    if n >= THREAD_OFFLOAD_INPUTS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _payload(loaded: LoadedModel, prepared: Prepared, scored: Scored, want_recon: bool) -> dict:
    threshold = loaded.threshold
    scores = scored.scores.tolist()
    results: list[dict] = []
    recons = scored.reconstructions
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
    name = loaded.ref.name
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
