"""Request inputs -> one validated float32 batch in the model's input shape.

Every conversion goes through `gansentry.preprocessing`, the code training used, so a
served input sees the same decoding, resizing, scaling and one-hot encoding. Every input
is checked before anything is queued: one bad input fails its own request with a 422
naming its index, and never reaches a batch shared with other requests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gansentry.manifest import ImageInput, Manifest, TabularInput
from gansentry.preprocessing import InputError, decode_base64_image, decode_image, screen_record
from service import metrics
from service.schemas import ScoreInput

RANGE_TOLERANCE = 1e-6


class InputsInvalid(ValueError):
    """One or more inputs are unusable; `errors` has one line per bad input."""

    def __init__(self, errors: list[str]) -> None:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(errors[0] + more)
        self.errors = errors


@dataclass(frozen=True)
class Prepared:
    x: np.ndarray  # float32 [n, *sample_shape]
    kinds: list[str]  # per input: "image", "array" or "record"
    reasons: dict[int, str] = field(default_factory=dict)  # input index -> why it is flagged


def prepare_json(inputs: Sequence[ScoreInput], manifest: Manifest, max_pixels: int) -> Prepared:
    spec = manifest.input
    x = np.empty((len(inputs), *spec.shape), dtype=np.float32)
    errors: list[str] = []
    reasons: dict[int, str] = {}
    for i, item in enumerate(inputs):
        try:
            if item.image is not None:
                x[i] = _image(item.image, manifest, max_pixels)
            elif item.array is not None:
                x[i] = _array(item.array, spec)
            else:
                x[i], reason = _record(item.record or {}, manifest)
                if reason is not None:
                    reasons[i] = reason
        except InputError as e:
            errors.append(f"inputs[{i}]: {e}")
    if errors:
        raise InputsInvalid(errors)
    return Prepared(x, [item.kind for item in inputs], reasons)


def prepare_images(images: Sequence[bytes], manifest: Manifest, max_pixels: int) -> Prepared:
    """Multipart uploads: raw PNG/JPEG bytes, in field order."""
    spec = manifest.input
    if not isinstance(spec, ImageInput):
        raise InputsInvalid([_not_image(manifest)])
    x = np.empty((len(images), *spec.shape), dtype=np.float32)
    errors: list[str] = []
    for i, data in enumerate(images):
        try:
            x[i] = decode_image(data, spec, max_pixels)
        except InputError as e:
            errors.append(f"inputs[{i}]: {e}")
    if errors:
        raise InputsInvalid(errors)
    return Prepared(x, ["image"] * len(images))


def _not_image(manifest: Manifest) -> str:
    return (
        f"model {manifest.name!r} takes tabular inputs "
        f"('record' or 'array' of {manifest.input.shape[0]} features), not images"
    )


def _image(text: str, manifest: Manifest, max_pixels: int) -> np.ndarray:
    if not isinstance(manifest.input, ImageInput):
        raise InputError(_not_image(manifest))
    return decode_base64_image(text, manifest.input, max_pixels)


def _array(value: list, spec: ImageInput | TabularInput) -> np.ndarray:
    expected = list(spec.shape)
    try:
        arr = np.asarray(value)
    except ValueError:
        raise InputError(f"expected array of shape {expected}, got a ragged nested list") from None
    if arr.dtype == object:
        raise InputError(
            f"expected array of shape {expected}, got a ragged nested list or non-numbers"
        )
    if arr.dtype.kind not in "iuf":
        what = (
            "booleans"
            if arr.dtype.kind == "b"
            else "strings"
            if arr.dtype.kind == "U"
            else arr.dtype
        )
        raise InputError(f"expected an array of numbers, got {what}")
    if list(arr.shape) != expected:
        raise InputError(f"expected array of shape {expected}, got {list(arr.shape)}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise InputError("array contains NaN or Inf")
    if spec.value_range is not None:
        lo, hi = spec.value_range
        amin, amax = float(arr.min()), float(arr.max())
        if amin < lo - RANGE_TOLERANCE or amax > hi + RANGE_TOLERANCE:
            raise InputError(
                f"expected values in [{lo:g}, {hi:g}] (scaled as in training), "
                f"got values from {amin:g} to {amax:g}"
            )
    return arr


def _record(record: dict, manifest: Manifest) -> tuple[np.ndarray, str | None]:
    """Features, and why the model's `anomaly` policy flags the record (None: it does not)."""
    spec = manifest.input
    if not isinstance(spec, TabularInput):
        raise InputError(
            f"model {manifest.name!r} takes images ('image' or 'array' of shape "
            f"{list(spec.shape)}), not records"
        )
    if spec.preprocessing is None:
        raise InputError(
            f"model {manifest.name!r} has no record preprocessing in its manifest; "
            f"send 'array' of {spec.num_features} features"
        )
    screened = screen_record(record, spec.preprocessing)
    for p in screened.problems:
        metrics.UNEXPECTED_VALUES.labels(manifest.name, p.field, p.kind).inc()
    return screened.x, screened.verdict(spec.preprocessing.unknown_policy)
