"""The Open Inference Protocol (KServe v2) over REST, for Triton and KServe clients
(`tritonclient.http` among them): server and model metadata, health and readiness, and
`infer`, with the binary tensor data extension in both directions.

A thin adapter over the scoring core (service/scoring.py), like `POST /score`: the same
deadline, limits, input checks, API keys and metrics; only the wire format differs.

- Inputs: one tensor per request, either `x` (FP32, shape `[n, *sample_shape]`, the
  graph's own input, validated row by row as `/score` validates an `array`), or, for
  image models, `image` (BYTES, shape `[n]`: encoded PNG/JPEG files, raw in binary data,
  base64 strings in JSON), decoded and resized as `/score` does.
- Outputs: `score` (FP32 `[n]`) and `is_anomaly` (BOOL `[n]`) by default; `reconstruction`
  (FP32 `[n, *sample_shape]`) only when named in `outputs`, since it is most of the bytes;
  likewise `anomaly_map` (FP32 `[n, H, W]`), for image models that have maps.
- Errors: `{"error": "..."}` with the status `/score` would give (404 unknown model, 413,
  422 a bad input value, 503, 504), and 400 for a request the protocol does not allow.
- Timeout: the request parameter `timeout` (microseconds, as Triton's clients send it) or
  the `X-Request-Timeout-Ms` header, capped by `request_timeout_ms`.
- Health answers by status alone, as the protocol says (200 true, 400 false, empty body);
  `/readyz` has the reasons in words."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gansentry import __version__
from gansentry.contract import ANOMALY_MAP_NAME, INPUT_NAME, RECONSTRUCTION_NAME, SCORE_NAME
from gansentry.manifest import ImageInput
from gansentry.preprocessing import InputError
from service.api.errors import INTERNAL_ERROR, classify
from service.api.health import readiness
from service.inputs import InputsInvalid, Parsed, numeric_array, parse_tensor
from service.registry import LoadedModel
from service.scoring import THREAD_OFFLOAD_INPUTS, Call, Result, begin, observed, offload

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"
IS_ANOMALY = "is_anomaly"
DEFAULT_OUTPUTS = (SCORE_NAME, IS_ANOMALY)
OUTPUTS = (SCORE_NAME, IS_ANOMALY, RECONSTRUCTION_NAME, ANOMALY_MAP_NAME)
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "onnxruntime_onnx"

router = APIRouter(prefix="/v2")


class V2Error(Exception):
    """A request the protocol does not allow: 400 with the message."""


class InferInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


class ErrorBody(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any]


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


def openapi_components() -> dict[str, dict]:
    """The request schema, which the infer routes parse themselves (binary data can
    follow the JSON), for the OpenAPI document."""
    schema = InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    return {**schema.pop("$defs", {}), "InferRequest": schema}


def _errors(*codes: int) -> dict[int | str, dict]:
    return {code: {"model": ErrorBody, "description": '{"error": message}'} for code in codes}


_NO_BODY = {"content": {}}
_KEYED = {"security": [{"APIKeyHeader": []}]}
_STATUS_ONLY: dict[int | str, dict] = {
    200: {"description": "true", **_NO_BODY},
    400: {"description": "false", **_NO_BODY},
}
_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"the JSON request, then binary tensors ({HEADER_LENGTH})",
            },
        },
    },
    **_KEYED,
}
_INFER_RESPONSES: dict[int | str, dict] = {
    200: {
        "model": InferResponse,
        "content": {
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
            }
        },
        "description": f"JSON, or JSON then binary outputs ({HEADER_LENGTH})",
    },
    **_errors(400, 401, 404, 413, 415, 422, 500, 503, 504),
}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _failure(e: Exception) -> JSONResponse:
    if isinstance(e, V2Error):
        return _error(400, str(e))
    failure = classify(e)
    if failure is None:
        log.exception("v2 request failed")
        return _error(500, INTERNAL_ERROR)
    return _error(failure.status, failure.message, failure.headers)


def _version(version: str | None) -> int | None:
    if version is None:
        return None
    # At most 9 digits: int() of thousands of digits raises, and no version is that high.
    if not (version.isascii() and version.isdigit()) or len(version) > 9 or int(version) < 1:
        raise V2Error(f"model version must be a positive integer, got {version[:40]!r}")
    return int(version)


@router.get("", summary="Server metadata (KServe v2)", response_model=ServerMetadata)
async def server_metadata() -> dict:
    return {"name": "gansentry", "version": __version__, "extensions": EXTENSIONS}


@router.get(
    "/health/live",
    summary="Server live (KServe v2): 200 when the process runs",
    response_class=Response,
    responses={200: _STATUS_ONLY[200]},
)
async def live() -> Response:
    return Response(status_code=200)


@router.get(
    "/health/ready",
    summary="Server ready (KServe v2): 200 ready, 400 not",
    response_class=Response,
    responses=_STATUS_ONLY,
)
async def ready(request: Request) -> Response:
    reasons, _ = await readiness(request)
    return Response(status_code=400 if reasons else 200)


def _metadata(loaded: LoadedModel, versions: list[int]) -> dict:
    shape = list(loaded.sample_shape)
    inputs = [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *shape]}]
    if isinstance(loaded.manifest.input, ImageInput):
        inputs.append({"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]})
    outputs = [
        {"name": SCORE_NAME, "datatype": "FP32", "shape": [-1]},
        {"name": IS_ANOMALY, "datatype": "BOOL", "shape": [-1]},
    ]
    if loaded.has_reconstruction:
        outputs.append({"name": RECONSTRUCTION_NAME, "datatype": "FP32", "shape": [-1, *shape]})
    if loaded.has_anomaly_map:
        outputs.append({"name": ANOMALY_MAP_NAME, "datatype": "FP32", "shape": [-1, *shape[1:]]})
    return {
        "name": loaded.ref.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {
            "threshold": loaded.threshold,
            "architecture": loaded.manifest.architecture,
            "provider": loaded.provider,
        },
    }


async def _model_metadata(request: Request, name: str, version: str | None) -> Response:
    call = begin(request)
    try:
        await call.authorize()
        loaded = call.registry.get(name, _version(version))
        versions = sorted(call.registry.models.get(name, {}))
        if version is not None:
            versions = [loaded.ref.version]
        return JSONResponse(_metadata(loaded, versions))
    except Exception as e:
        return _failure(e)


async def _model_ready(request: Request, name: str, version: str | None) -> Response:
    call = begin(request)
    try:
        await call.authorize()
        loaded = call.registry.get(name, _version(version))
        ok, _ = await call.batcher.ready()
        ready = ok and call.batcher.serves(loaded.ref)
        return Response(status_code=200 if ready else 400)
    except Exception as e:
        return _failure(e)


@router.get(
    "/models/{name}",
    summary="Model metadata (KServe v2)",
    response_model=ModelMetadata,
    responses=_errors(400, 401, 404),
    openapi_extra=_KEYED,
)
async def model_metadata(name: str, request: Request) -> Response:
    return await _model_metadata(request, name, None)


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model version metadata (KServe v2)",
    response_model=ModelMetadata,
    responses=_errors(400, 401, 404),
    openapi_extra=_KEYED,
)
async def model_version_metadata(name: str, version: str, request: Request) -> Response:
    return await _model_metadata(request, name, version)


@router.get(
    "/models/{name}/ready",
    summary="Model ready (KServe v2): 200 ready, 400 not",
    response_class=Response,
    responses={**_STATUS_ONLY, **_errors(401, 404)},
    openapi_extra=_KEYED,
)
async def model_ready(name: str, request: Request) -> Response:
    return await _model_ready(request, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Model version ready (KServe v2): 200 ready, 400 not",
    response_class=Response,
    responses={**_STATUS_ONLY, **_errors(401, 404)},
    openapi_extra=_KEYED,
)
async def model_version_ready(name: str, version: str, request: Request) -> Response:
    return await _model_ready(request, name, version)


@router.post(
    "/models/{name}/infer",
    summary="Inference (KServe v2)",
    response_model=None,
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_DOC,
)
async def infer(name: str, request: Request) -> Response:
    """An Open Inference Protocol request: JSON, or JSON followed by binary tensors with
    `Inference-Header-Content-Length` (tritonclient's default)."""
    return await _infer(request, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference of one model version (KServe v2)",
    response_model=None,
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_DOC,
)
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    with observed(begin(request)) as call:
        try:
            await call.authorize()
            loaded = call.model(name, _version(version))
            if request.headers.get("content-encoding", "identity").lower() != "identity":
                raise HTTPException(415, "send the request uncompressed (no Content-Encoding)")
            req, binary = _split(await request.body(), request.headers.get(HEADER_LENGTH))
            timeout_s = call.timeout_s(_timeout_ms(req.parameters))
            wanted = _wanted(req)
            parsed = await _inputs(call, loaded, req, binary)
            result = await call.score(
                loaded,
                parsed,
                timeout_s,
                RECONSTRUCTION_NAME in wanted,
                ANOMALY_MAP_NAME in wanted,
            )
            if result is None:
                return Response(status_code=call.status)
            answer = _answer(req, result, wanted)
        except Exception as e:
            answer = _failure(e)
        call.status = answer.status_code
        return answer


def _split(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """The JSON inference header and the binary tensor data after it."""
    if header_length is None:
        head, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise V2Error(
                f"{HEADER_LENGTH} must be the length of the JSON header, between 0 and the "
                f"body's {len(body)} bytes"
            )
        head, binary = body[:n], body[n:]
    try:
        return InferRequest.model_validate_json(head), binary
    except ValidationError as e:
        failure = classify(e)
        assert failure is not None
        raise V2Error(f"invalid inference request: {failure.message}") from None


def _timeout_ms(parameters: dict[str, Any]) -> float | None:
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise V2Error("parameter 'timeout' must be a positive number of microseconds")
    return timeout / 1000.0


def _wanted(req: InferRequest) -> dict[str, bool]:
    """Requested output name -> whether it goes back as binary data."""
    default_binary = _flag(req.parameters, "binary_data_output", False)
    if req.outputs is None:
        return {name: default_binary for name in DEFAULT_OUTPUTS}
    wanted: dict[str, bool] = {}
    for out in req.outputs:
        if out.name not in OUTPUTS:
            raise V2Error(f"unknown output {out.name!r}; the model has {', '.join(OUTPUTS)}")
        if out.name in wanted:
            raise V2Error(f"output {out.name!r} is requested twice")
        wanted[out.name] = _flag(out.parameters, "binary_data", default_binary)
    return wanted


def _flag(parameters: dict[str, Any], key: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise V2Error(f"parameter {key!r} must be true or false")
    return value


async def _inputs(call: Call, loaded: LoadedModel, req: InferRequest, binary: bytes) -> Parsed:
    if len(req.inputs) != 1:
        raise V2Error(f"send one input tensor ({_input_names(loaded)}), got {len(req.inputs)}")
    tensor = req.inputs[0]
    raw = _binary_part(tensor, binary)
    if tensor.name == INPUT_NAME:
        batch = _fp32(tensor, raw, list(loaded.sample_shape))
        call.check_count(len(batch))
        return await offload(
            len(batch) >= THREAD_OFFLOAD_INPUTS, parse_tensor, batch, loaded.manifest
        )
    if tensor.name == IMAGE_INPUT and isinstance(loaded.manifest.input, ImageInput):
        return await call.parse_images(loaded, _images(tensor, raw))
    raise V2Error(
        f"unknown input {tensor.name!r}; model {loaded.ref.name!r} takes {_input_names(loaded)}"
    )


def _input_names(loaded: LoadedModel) -> str:
    if isinstance(loaded.manifest.input, ImageInput):
        return f"'{INPUT_NAME}' (FP32) or '{IMAGE_INPUT}' (BYTES)"
    return f"'{INPUT_NAME}' (FP32)"


def _binary_part(tensor: InferInput, binary: bytes) -> bytes | None:
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise V2Error(
                f"{len(binary)} bytes of binary data follow the header, but input "
                f"{tensor.name!r} has no 'binary_data_size'"
            )
        if tensor.data is None:
            raise V2Error(f"input {tensor.name!r} has neither 'data' nor 'binary_data_size'")
        return None
    if tensor.data is not None:
        raise V2Error(f"input {tensor.name!r} has both 'data' and 'binary_data_size'")
    if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
        raise V2Error(
            f"input {tensor.name!r} declares binary_data_size {size!r}, but {len(binary)} "
            "bytes follow the header"
        )
    return binary


def _fp32(tensor: InferInput, raw: bytes | None, sample: list[int]) -> np.ndarray:
    """The `x` tensor as an array [n, *sample_shape] (float32 from binary data, the JSON
    numbers as they came otherwise), its shape checked against the model's."""
    if tensor.datatype != "FP32":
        raise V2Error(f"input {INPUT_NAME!r} must be FP32, got {tensor.datatype!r}")
    shape = tensor.shape
    if len(shape) != 1 + len(sample) or shape[1:] != sample or shape[0] < 1:
        raise V2Error(
            f"input {INPUT_NAME!r} has shape {shape}; the model takes "
            f"[n, {', '.join(str(d) for d in sample)}] with n >= 1"
        )
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != 4 * count:
            raise V2Error(
                f"input {INPUT_NAME!r} of shape {shape} needs {4 * count} bytes of FP32 data, "
                f"got {len(raw)}"
            )
        return np.frombuffer(raw, dtype="<f4").reshape(shape)
    try:
        numbers = numeric_array(tensor.data, shape)
    except InputError as e:
        raise InputsInvalid([f"input {INPUT_NAME!r}: {e}"]) from None
    if numbers.size != count:
        raise V2Error(
            f"input {INPUT_NAME!r} has shape {shape} ({count} values) but its data holds "
            f"{numbers.size}"
        )
    return numbers.reshape(shape)


def _images(tensor: InferInput, raw: bytes | None) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise V2Error(f"input {IMAGE_INPUT!r} must be BYTES, got {tensor.datatype!r}")
    if len(tensor.shape) not in (1, 2) or tensor.shape[0] < 1 or tensor.shape[1:] not in ([], [1]):
        raise V2Error(
            f"input {IMAGE_INPUT!r} has shape {tensor.shape}; send [n] (or [n, 1]) encoded images"
        )
    n = tensor.shape[0]
    if raw is not None:
        images = _deserialize_bytes(raw)
    else:
        images = []
        for i, item in enumerate(tensor.data or []):
            if not isinstance(item, str):
                raise V2Error(f"input {IMAGE_INPUT!r}: data[{i}] must be a base64 string")
            try:
                images.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise InputsInvalid([f"inputs[{i}]: image is not valid base64"]) from None
    if len(images) != n:
        raise V2Error(
            f"input {IMAGE_INPUT!r} has shape {tensor.shape} but holds {len(images)} images"
        )
    return images


def _deserialize_bytes(raw: bytes) -> list[bytes]:
    """Triton's BYTES layout: each element is a little-endian uint32 length, then that
    many bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise V2Error("BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise V2Error("BYTES data ends inside an element")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def _answer(req: InferRequest, result: Result, wanted: dict[str, bool]) -> Response:
    n = len(result.scores)
    outputs: list[dict] = []
    chunks: list[bytes] = []
    for name, as_binary in wanted.items():
        if name == SCORE_NAME:
            arr, datatype = result.score_array.astype("<f4", copy=False), "FP32"
        elif name == IS_ANOMALY:
            arr, datatype = np.array(result.is_anomaly, dtype=bool), "BOOL"
        elif name == ANOMALY_MAP_NAME:
            assert result.anomaly_maps is not None, "asked for anomaly maps"
            arr, datatype = result.anomaly_maps.astype("<f4", copy=False), "FP32"
        else:
            assert result.reconstructions is not None, "asked for reconstructions"
            arr, datatype = result.reconstructions.astype("<f4", copy=False), "FP32"
        out: dict = {"name": name, "datatype": datatype, "shape": [n, *arr.shape[1:]]}
        if as_binary:
            data = arr.tobytes()
            out["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            out["data"] = arr.ravel().tolist()
        outputs.append(out)
    loaded = result.loaded
    body: dict = {"model_name": loaded.ref.name, "model_version": str(loaded.ref.version)}
    if req.id is not None:
        body["id"] = req.id
    body["outputs"] = outputs
    head = json.dumps(body, allow_nan=False).encode()
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *chunks]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )
