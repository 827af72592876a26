"""POST /score: JSON or multipart in, one scored result per input out, in input order.

A thin adapter over the scoring core (service/scoring.py), which owns deadlines, limits,
disconnects, refusals and metrics: this module parses the two wire formats and writes the
answer. The body is parsed straight from bytes by pydantic-core and the answer is
serialised without a response model, because on a couple of cores the per-request
overhead, not ONNX Runtime, decides throughput."""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from gansentry.anomaly_map import heatmap_base64_png
from gansentry.preprocessing import array_to_base64_png
from service.api.errors import INTERNAL_ERROR, error_response
from service.inputs import Parsed, parse_json
from service.registry import LoadedModel
from service.schemas import ErrorResponse, MapFormat, ScoreRequest, ScoreResponse
from service.scoring import THREAD_OFFLOAD_INPUTS, Call, Result, begin, observed, offload

JSON_TYPE, MULTIPART_TYPE = "application/json", "multipart/form-data"

log = logging.getLogger(__name__)

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
    return_anomaly_map: bool = False
    anomaly_map_format: MapFormat = "png"


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
            _query("return_anomaly_map", {"type": "boolean"}, _MULTIPART_ONLY),
            _query(
                "anomaly_map_format", {"type": "string", "enum": ["png", "array"]}, _MULTIPART_ONLY
            ),
        ],
        "security": [{"APIKeyHeader": []}],
    },
)
async def score(request: Request) -> Response:
    """JSON: `{"model", "version"?, "inputs": [{"image"} | {"array"} | {"record"}],
    "return_reconstruction"?, "return_anomaly_map"?, "anomaly_map_format"?, "timeout_ms"?}`.
    Multipart: `?model=NAME` (and the same options) with one or more `image` file fields.
    A bad input fails its whole request with a 422 naming it; inputs past
    `max_inputs_per_request`, or images past `max_request_pixels` in all, are refused
    with 413. Content types are matched as media types (case-insensitive, parameters
    allowed); a body without one is read as JSON."""
    with observed(begin(request)) as call:
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        try:
            await call.authorize()
            if media == MULTIPART_TYPE:
                if "model" not in request.query_params:
                    raise HTTPException(422, "multipart uploads need ?model=NAME in the URL")
                query = MultipartQuery.model_validate(dict(request.query_params))
                loaded = call.model(query.model, query.version)
                timeout_s = call.timeout_s(None)
                parsed = await _multipart(call, loaded)
                want_recon = query.return_reconstruction
                want_map, map_format = query.return_anomaly_map, query.anomaly_map_format
            elif media == JSON_TYPE or not media:
                if request.query_params:
                    raise HTTPException(
                        422,
                        "query parameters apply to multipart uploads only; a JSON request "
                        "names its model, version and options in the body, got "
                        f"?{', ?'.join(sorted(set(request.query_params)))}",
                    )
                body = ScoreRequest.model_validate_json(await request.body())
                loaded = call.model(body.model, body.version)
                call.check_count(len(body.inputs))
                timeout_s = call.timeout_s(body.timeout_ms)
                settings = call.settings
                parsed = await offload(
                    len(body.inputs) >= THREAD_OFFLOAD_INPUTS,
                    parse_json,
                    body.inputs,
                    loaded.manifest,
                    settings.max_image_pixels,
                    settings.max_request_pixels,
                )
                want_recon = body.return_reconstruction
                want_map, map_format = body.return_anomaly_map, body.anomaly_map_format
            else:
                raise HTTPException(
                    415, f"send application/json or multipart/form-data, not {ctype[:100]!r}"
                )
            result = await call.score(loaded, parsed, timeout_s, want_recon, want_map)
            if result is None:
                return Response(status_code=call.status)
            payload = await offload(
                (want_recon or want_map) and len(result.kinds) >= THREAD_OFFLOAD_INPUTS,
                _payload,
                result,
                map_format,
            )
            # allow_nan=False: an answer is valid JSON or not sent (the core refuses NaN).
            content = json.dumps(payload, allow_nan=False)
        except Exception as e:
            answer = error_response(e)
            if answer is None:
                # A bug, not the client's fault. Answered here rather than re-raised, so the
                # keep-alive connection stays usable; the traceback goes to the log only.
                log.exception("scoring request failed")
                answer = JSONResponse({"detail": INTERNAL_ERROR}, status_code=500)
            call.status = answer.status_code
            return answer
        call.status = 200
        return Response(content, media_type="application/json")


async def _multipart(call: Call, loaded: LoadedModel) -> Parsed:
    limit = call.settings.max_inputs_per_request
    try:
        form = await call.request.form(max_files=limit, max_fields=limit)
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
    return await call.parse_images(loaded, images)


def _payload(result: Result, map_format: MapFormat = "png") -> dict:
    recons, maps = result.reconstructions, result.anomaly_maps
    info = result.loaded.manifest.anomaly_map
    results: list[dict] = []
    for i, s in enumerate(result.scores):
        item: dict = {"score": s, "is_anomaly": result.is_anomaly[i]}
        reason = result.reasons.get(i)
        if reason is not None:
            item["reason"] = reason
        if recons is not None:
            recon = recons[i]
            item["reconstruction"] = (
                array_to_base64_png(recon) if result.kinds[i] == "image" else recon.tolist()
            )
        if maps is not None:
            assert info is not None, "only models with anomaly maps return them"
            amap = maps[i]
            item["anomaly_map"] = (
                heatmap_base64_png(amap, info.vmax) if map_format == "png" else amap.tolist()
            )
            item["anomaly_map_max"] = float(amap.max())
        results.append(item)
    loaded = result.loaded
    return {
        "model": loaded.ref.name,
        "version": loaded.ref.version,
        "threshold": loaded.threshold,
        "results": results,
    }
