"""Request and response bodies of the HTTP API, with the examples /docs shows.

Inputs are typed loosely here (`array: list`, `record: dict`) on purpose: the model's
manifest decides what is valid, and `service.inputs` checks each input against it with a
message naming its index, which a generic schema error could not do.

The published schema and the parser agree: the request is parsed in strict mode (`"1"` or
`true` is not a version), an input's field is a value, never `null`, and the schema says
"exactly one of image, array, record" with `oneOf`, as the validator does. Every example
here is scored by the shipped models (tests/test_hostile_inputs.py checks that)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

_PNG_1PX = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="
)


_INPUT_FIELDS = ("image", "array", "record")
MapFormat = Literal["png", "array"]


def _no_default(schema: dict[str, Any]) -> None:
    """Absent, not null: the schema shows no `default: null` that the parser would refuse."""
    schema.pop("default", None)


def _one_field(schema: dict[str, Any]) -> None:
    schema["oneOf"] = [{"required": [name]} for name in _INPUT_FIELDS]
    schema["minProperties"] = schema["maxProperties"] = 1


def _example_record() -> dict[str, Any]:
    """The README's KDD flow, so the documented example is a full record that the shipped
    `kdd-egbad` scores (a partial one is refused: every field of the manifest is needed)."""
    path = Path(__file__).resolve().parent.parent / "docs" / "examples" / "kdd-normal-traffic.json"
    try:
        return json.loads(path.read_text())["record"]
    except OSError:  # installed without the docs: the example shows the shape only
        return {"duration": 0, "protocol_type": "tcp", "src_bytes": 181}


class ScoreInput(BaseModel):
    """Exactly one of `image`, `array` or `record`."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_one_field)

    image: str | SkipJsonSchema[None] = Field(
        None,
        description="base64 PNG or JPEG (a `data:` URL prefix is accepted)",
        json_schema_extra=_no_default,
    )
    array: list[Any] | SkipJsonSchema[None] = Field(
        None,
        description="nested list in the model's input shape, e.g. [1, 32, 32] of floats in "
        "[0, 1] for a grey 32x32 model, or [F] preprocessed features for a tabular one",
        json_schema_extra=_no_default,
    )
    record: dict[str, Any] | SkipJsonSchema[None] = Field(
        None,
        description="raw tabular record: every field of the model's manifest, no others",
        json_schema_extra=_no_default,
    )

    @field_validator(*_INPUT_FIELDS, mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        # Runs only for a value the client sent (defaults are not validated).
        if value is None:
            raise ValueError("must not be null; leave the field out instead")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> ScoreInput:
        given = [k for k in _INPUT_FIELDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "each input needs exactly one of 'image', 'array' or 'record'"
                + (f", got {' and '.join(given)}" if given else "")
            )
        return self

    @property
    def kind(self) -> str:
        if self.image is not None:
            return "image"
        return "array" if self.array is not None else "record"


class ScoreRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model": "mnist-ganomaly",
                    "inputs": [{"image": _PNG_1PX}],
                    "return_reconstruction": True,
                },
                {"model": "kdd-egbad", "version": 2, "inputs": [{"record": _example_record()}]},
            ]
        },
    )

    model: str = Field(description="model name, as listed by GET /models")
    version: int | None = Field(None, ge=1, description="default: the latest version")
    inputs: list[ScoreInput] = Field(min_length=1)
    return_reconstruction: bool = Field(
        False, description="add each input's reconstruction (PNG for images, else a list)"
    )
    return_anomaly_map: bool = Field(
        False,
        description="image models with anomaly maps: add each input's map (where the "
        "reconstruction differs from the input, smoothed) and its maximum `anomaly_map_max`",
    )
    anomaly_map_format: MapFormat = Field(
        "png",
        description="png: a base64 PNG heat map, colour scale 0 to the model's "
        "anomaly_map.vmax; array: the raw float map, a nested list [H][W]",
    )
    timeout_ms: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="deadline for this request, decoding included; capped by the server's limit",
    )


class ScoreResult(BaseModel):
    score: float
    is_anomaly: bool
    reason: str | None = Field(
        None, description="why a record is flagged whatever its score (unknown_policy: anomaly)"
    )
    reconstruction: str | list[Any] | None = Field(
        None, description="base64 PNG for image inputs, a nested list for array and record inputs"
    )
    anomaly_map: str | list[Any] | None = Field(
        None, description="base64 PNG heat map, or a nested list [H][W] (anomaly_map_format)"
    )
    anomaly_map_max: float | None = Field(None, description="the map's largest value")


class ScoreResponse(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model": "mnist-ganomaly",
                    "version": 3,
                    "threshold": 0.42,
                    "results": [{"score": 0.57, "is_anomaly": True, "reconstruction": _PNG_1PX}],
                }
            ]
        },
    )

    model: str
    version: int
    threshold: float
    results: list[ScoreResult] = Field(description="one per input, in input order")


class ErrorResponse(BaseModel):
    detail: str
    errors: list[str] | None = Field(None, description="one line per bad input")


class ModelVersionInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    version: int
    architecture: str
    provider: str
    input: dict[str, Any]
    threshold: dict[str, Any]
    metrics: dict[str, float | None]
    provenance: dict[str, Any]
    sha256: str
    created_at: str
    outputs: list[str] = Field(description="the graph's outputs; anomaly_map: it has maps")
    anomaly_map: dict[str, Any] | None = Field(
        None, description="smoothing and heat-map colour scale, for models with anomaly maps"
    )


class ModelInfo(BaseModel):
    name: str
    latest: int
    versions: list[ModelVersionInfo]


class ModelList(BaseModel):
    models: list[ModelInfo]
    refused: dict[str, str] = Field(
        description="NAME/VERSION -> why it is not served (a previous copy may still serve)"
    )


class ReloadResponse(BaseModel):
    loaded: list[str]
    errors: dict[str, str]


class ReadyResponse(BaseModel):
    ready: bool
    reasons: list[str] = Field(description="why not ready, in words (no paths or internals)")
    models: list[str]
    details: list[str] | None = Field(
        None, description="only with a valid X-API-Key: each failed version's error, and more"
    )
