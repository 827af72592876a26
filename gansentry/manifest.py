"""The manifest schema: what `gansentry export` writes beside each model.onnx and what
the service trusts when it loads one. Training and serving both import this module, so
the two sides cannot disagree about a field."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gansentry.contract import (
    ANOMALY_MAP_NAME,
    DEFAULT_OUTPUTS,
    MANIFEST_FILE,
    MIN_OPSET,
    MODEL_FILE,
    OPTIONAL_OUTPUTS,
    RECONSTRUCTION_NAME,
    REQUIRED_OUTPUTS,
)

SCHEMA_VERSION = 1
# Any architecture whose graph honours the contract is served: the service never looks at
# this name, so a newly registered model needs no schema or service change.
ARCHITECTURE_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"


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
    """One field of a raw record. Symbolic fields are one-hot encoded over `vocabulary`,
    matched by value: 1, 1.0, "1" and true are the entry "1" (or "true"), see
    `gansentry.preprocessing.category_key`. A served value outside the vocabulary is
    refused or flagged by the model's `unknown_policy`; in a dataset it encodes as all
    zeros (it was never seen in training). A numeric field with `transform: log1p` (byte
    counts, durations) is replaced by log(1 + v) before scaling: min-max scaling alone
    squashes a heavy tail so far that 54 kB and 250 B both become about 0."""

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
    feature. Fitted on the training split only.

    `unknown_policy` says what the service does with a record value the model does not
    know (an unseen category, a symbolic value of the wrong type, a number that does not
    fit float32 or lies past `gansentry.preprocessing.RANGE_LIMIT` training ranges):
    `reject` (the default, and what manifests without the field mean) answers 422 naming
    the input, field and value; `anomaly` scores the record, flags it and says why."""

    columns: list[Column]
    scaling: Literal["minmax", "standard", "none"]
    offset: list[float]
    scale: list[float]
    unknown_policy: Literal["reject", "anomaly"] = "reject"

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


class ValidationScores(_Strict):
    """The validation-normal scores a threshold was calibrated on: their spread, how many
    sit exactly on the threshold (a tie makes `score > threshold` flag fewer than asked),
    and the share of them the threshold really flags."""

    n: int = Field(ge=1)
    min: float
    quantiles: dict[str, float]  # "0.5", "0.9", ... -> score
    max: float
    ties_at_threshold: int = Field(ge=0)
    flagged_fraction: float = Field(ge=0, le=1)


class Threshold(_Strict):
    """Scores above `value` are anomalies. `rule` says how it was chosen, in words a reader
    of /models can check (e.g. "99th percentile of 5,400 validation-normal scores").
    `target_fpr` is set when the rule was a false-positive rate rather than a quantile;
    `validation` (absent in older manifests) describes the scores it came from."""

    value: float
    rule: str
    quantile: float | None = None
    calibration_size: int | None = None
    target_fpr: float | None = None
    validation: ValidationScores | None = None


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
    # Set on a version published from another without training (gansentry add-anomaly-map):
    # which version, and what changed.
    derived_from: str | None = None


class OnnxInfo(_Strict):
    file: str = MODEL_FILE
    sha256: str
    opset: int = Field(ge=MIN_OPSET)
    parity_max_rel_diff: float | None = None


class AnomalyMapInfo(_Strict):
    """How the graph's `anomaly_map` output is made and shown (gansentry/anomaly_map.py):
    the Gaussian smoothing's `sigma_px`, and `vmax`, the top of the heat-map colour scale,
    chosen by `vmax_rule` (in words, e.g. "99.9th percentile of 592 validation-normal maps'
    pixels")."""

    sigma_px: float = Field(gt=0)
    vmax: float = Field(gt=0, allow_inf_nan=False)
    vmax_rule: str


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: int = Field(ge=1)
    architecture: str
    input: InputSpec
    threshold: Threshold
    provenance: Provenance
    metrics: dict[str, float | None] = {}
    # Why metrics are null where they are (e.g. no labelled anomalies to test on).
    metrics_note: str | None = None
    onnx: OnnxInfo
    # The graph's outputs the service may ask for (gansentry/contract.py): `score`, and
    # `reconstruction` and `anomaly_map` where the model has them.
    outputs: list[str] = list(DEFAULT_OUTPUTS)
    anomaly_map: AnomalyMapInfo | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, value: str) -> str:
        if not re.fullmatch(ARCHITECTURE_PATTERN, value):
            raise ValueError(
                f"architecture {value!r} must be a lower-case name: a letter, then up to 63 "
                "letters, digits, '_' or '-'"
            )
        return value

    @model_validator(mode="after")
    def _outputs(self) -> Manifest:
        known = (*REQUIRED_OUTPUTS, *OPTIONAL_OUTPUTS)
        unknown = [o for o in self.outputs if o not in known]
        if unknown or len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"outputs must be distinct names among {', '.join(known)}")
        missing = [o for o in REQUIRED_OUTPUTS if o not in self.outputs]
        if missing:
            raise ValueError(f"outputs must include {', '.join(missing)}")
        if (ANOMALY_MAP_NAME in self.outputs) != (self.anomaly_map is not None):
            raise ValueError(f"an {ANOMALY_MAP_NAME!r} output needs anomaly_map settings, and back")
        if self.anomaly_map is not None and not isinstance(self.input, ImageInput):
            raise ValueError("anomaly maps are for image models")
        if self.has_anomaly_map and not self.has_reconstruction:
            # The map is |x - reconstruction|: a model without one has nothing to map.
            raise ValueError(f"an {ANOMALY_MAP_NAME!r} output needs a {RECONSTRUCTION_NAME!r} one")
        return self

    @property
    def has_anomaly_map(self) -> bool:
        return ANOMALY_MAP_NAME in self.outputs

    @property
    def has_reconstruction(self) -> bool:
        return RECONSTRUCTION_NAME in self.outputs

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        return cls.model_validate_json((Path(directory) / MANIFEST_FILE).read_text())

    def save(self, directory: Path) -> None:
        atomic_write(Path(directory) / MANIFEST_FILE, self.model_dump_json(indent=2).encode())


class ModelFolderError(ValueError):
    """A model folder's manifest or graph cannot be trusted; the message says which and
    why, without the folder's path (callers add what their users need)."""


def load_verified(directory: Path) -> Manifest:
    """The manifest of a `models/NAME/VERSION` folder, after checking what the service and
    offline scoring both check before running the graph: the manifest parses against this
    schema, and `model.onnx` exists with the sha256 the manifest records."""
    directory = Path(directory)
    try:
        manifest = Manifest.load(directory)
    except FileNotFoundError as e:
        raise ModelFolderError(f"no {MANIFEST_FILE}") from e
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ModelFolderError(f"invalid {MANIFEST_FILE}: {where}: {first['msg']}") from e
    except ValueError as e:
        raise ModelFolderError(f"invalid {MANIFEST_FILE}: {e}") from e
    onnx_path = directory / MODEL_FILE
    if not onnx_path.is_file():
        raise ModelFolderError(f"no {MODEL_FILE}")
    digest = sha256_file(onnx_path)
    if digest != manifest.onnx.sha256:
        raise ModelFolderError(
            f"sha256 of {MODEL_FILE} is {digest[:12]}..., "
            f"manifest says {manifest.onnx.sha256[:12]}..."
        )
    return manifest


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
