"""Request and response bodies of the HTTP API, with the examples /docs shows.

Inputs are typed loosely here (`array: list`, `record: dict`) on purpose: the model's
manifest decides what is valid, and `service.inputs` checks each input against it with a
message naming its index, which a generic schema error could not do."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

_PNG_1PX = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="
)


class ScoreInput(BaseModel):
    """Exactly one of `image`, `array` or `record`."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(
        None, description="base64 PNG or JPEG (a `data:` URL prefix is accepted)"
    )
    array: list[Any] | None = Field(
        None,
        description="nested list in the model's input shape, e.g. [1, 32, 32] of floats in "
        "[0, 1] for a grey 32x32 model, or [F] preprocessed features for a tabular one",
    )
    record: dict[str, Any] | None = Field(
        None, description="raw tabular record: every field of the model's manifest, no others"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ScoreInput:
        given = [k for k in ("image", "array", "record") if getattr(self, k) is not None]
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
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model": "mnist-ganomaly",
                    "inputs": [{"image": _PNG_1PX}],
                    "return_reconstruction": True,
                },
                {
                    "model": "kdd-egbad",
                    "version": 1,
                    "inputs": [
                        {"record": {"duration": 0, "protocol_type": "tcp", "src_bytes": 181}}
                    ],
                },
            ]
        },
    )

    model: str = Field(description="model name, as listed by GET /models")
    version: int | None = Field(None, ge=1, description="default: the latest version")
    inputs: list[ScoreInput] = Field(min_length=1)
    return_reconstruction: bool = Field(
        False, description="add each input's reconstruction (PNG for images, else a list)"
    )
    timeout_ms: float | None = Field(
        None, gt=0, description="deadline for this request; capped by the server's limit"
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
    reasons: list[str]
    models: list[str]
