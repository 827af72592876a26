"""The manifest schema: what `gansentry export` writes beside each model.onnx and what
the service trusts when it loads one. Training and serving both import this module, so
the two sides cannot disagree about a field."""

from __future__ import annotations

import hashlib
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gansentry.contract import MANIFEST_FILE, MIN_OPSET, MODEL_FILE

SCHEMA_VERSION = 1
Architecture = Literal["ganomaly", "egbad", "memgan"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageInput(_Strict):
    """Pixels scaled to [0, 1] at the model's native size, channels first."""

    kind: Literal["image"] = "image"
    channels: Literal[1, 3]
    height: int = Field(ge=8, le=1024)
    width: int = Field(ge=8, le=1024)
    value_range: tuple[float, float] = (0.0, 1.0)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, self.height, self.width)


class Column(_Strict):
    """One field of a raw record. Symbolic fields are one-hot encoded over `vocabulary`;
    a value outside the vocabulary encodes as all zeros (it was never seen in training).
    A numeric field with `transform: log1p` (byte counts, durations) is replaced by
    log(1 + v) before scaling: min-max scaling alone squashes a heavy tail so far that
    54 kB and 250 B both become about 0."""

    name: str
    kind: Literal["numeric", "symbolic"]
    vocabulary: list[str] | None = None
    transform: Literal["none", "log1p"] = "none"

    @model_validator(mode="after")
    def _vocab_for_symbolic(self) -> Column:
        if self.kind == "symbolic" and not self.vocabulary:
            raise ValueError(f"symbolic column {self.name!r} needs a vocabulary")
        if self.kind == "numeric" and self.vocabulary is not None:
            raise ValueError(f"numeric column {self.name!r} cannot have a vocabulary")
        if self.kind == "symbolic" and self.transform != "none":
            raise ValueError(f"symbolic column {self.name!r} cannot have a transform")
        return self

    @property
    def width(self) -> int:
        return len(self.vocabulary) if self.vocabulary else 1

    def feature_names(self) -> list[str]:
        if self.vocabulary:
            return [f"{self.name}={v}" for v in self.vocabulary]
        return [self.name]


class TabularPreprocessing(_Strict):
    """Raw record -> model features: expand `columns` in order (one-hot for symbolic, each
    numeric field through its `transform`), then `(v - offset) / scale` per expanded
    feature. Fitted on the training split only."""

    columns: list[Column]
    scaling: Literal["minmax", "standard", "none"]
    offset: list[float]
    scale: list[float]

    @model_validator(mode="after")
    def _lengths(self) -> TabularPreprocessing:
        n = sum(c.width for c in self.columns)
        if len(self.offset) != n or len(self.scale) != n:
            raise ValueError(f"offset/scale must have {n} entries, one per expanded feature")
        if any(s == 0 for s in self.scale):
            raise ValueError("scale entries must be non-zero")
        return self

    @property
    def num_features(self) -> int:
        return len(self.offset)

    def feature_names(self) -> list[str]:
        return [f for c in self.columns for f in c.feature_names()]


class TabularInput(_Strict):
    kind: Literal["tabular"] = "tabular"
    num_features: int = Field(ge=1)
    feature_names: list[str]
    value_range: tuple[float, float] | None = None
    preprocessing: TabularPreprocessing | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TabularInput:
        if len(self.feature_names) != self.num_features:
            raise ValueError("feature_names must have num_features entries")
        prep = self.preprocessing
        if prep is not None and prep.feature_names() != self.feature_names:
            raise ValueError("feature_names must match the preprocessing's expanded columns")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_features,)


InputSpec = Annotated[ImageInput | TabularInput, Field(discriminator="kind")]


class Threshold(_Strict):
    """Scores above `value` are anomalies. `rule` says how it was chosen, in words a reader
    of /models can check (e.g. "99th percentile of 5,400 validation-normal scores")."""

    value: float
    rule: str
    quantile: float | None = None
    calibration_size: int | None = None


class Provenance(_Strict):
    dataset: str
    protocol: str
    normal_classes: list[str] = []
    anomalous_classes: list[str] = []
    epochs: int
    seed: int
    git_commit: str | None = None
    training_seconds: float | None = None
    selected_epoch: int | None = None
    hyperparameters: dict[str, float | int | str | bool | None] = {}


class OnnxInfo(_Strict):
    file: str = MODEL_FILE
    sha256: str
    opset: int = Field(ge=MIN_OPSET)
    parity_max_rel_diff: float | None = None


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: int = Field(ge=1)
    architecture: Architecture
    input: InputSpec
    threshold: Threshold
    provenance: Provenance
    metrics: dict[str, float | None] = {}
    # Why metrics are null where they are (e.g. no labelled anomalies to test on).
    metrics_note: str | None = None
    onnx: OnnxInfo
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        return cls.model_validate_json((Path(directory) / MANIFEST_FILE).read_text())

    def save(self, directory: Path) -> None:
        atomic_write(Path(directory) / MANIFEST_FILE, self.model_dump_json(indent=2).encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file and rename, so a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
