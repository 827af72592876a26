"""Request inputs -> one validated float32 batch in the model's input shape.

Every conversion goes through `gansentry.preprocessing`, the code training used, so a
served input sees the same decoding, resizing, scaling and one-hot encoding. Every input
is checked before anything is queued: one bad input fails its own request with a 422
naming its index, and never reaches a batch shared with other requests.

Two steps, because decoding pixels is the one costly part of a request and a small body
can hold a lot of them (a 4000x4000 1-bit PNG is 2 kB): `parse_*` checks every input and
reads only image headers, and adds up the pixels they declare against the request's budget,
so a request past it is refused before any pixel is decoded (and after reading only the
headers up to the one that crossed it); `decode` then decodes the images one by one and
stops at the request's deadline."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gansentry.manifest import ImageInput, Manifest, TabularInput
from gansentry.preprocessing import (
    InputError,
    OpenedImage,
    base64_image_bytes,
    decode_opened,
    open_image,
    screen_record,
)
from service import metrics
from service.batching.base import DeadlineExceeded
from service.schemas import ScoreInput

RANGE_TOLERANCE = 1e-6
FLOAT32_MAX = float(np.finfo(np.float32).max)


class InputsInvalid(ValueError):
    """One or more inputs are unusable; `errors` has one line per bad input."""

    def __init__(self, errors: list[str]) -> None:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(errors[0] + more)
        self.errors = errors


class PixelBudgetExceeded(ValueError):
    """The request's images would decode to more pixels than one request may: 413."""


@dataclass(frozen=True)
class Prepared:
    x: np.ndarray  # float32 [n, *sample_shape]
    kinds: list[str]  # per input: "image", "array" or "record"
    reasons: dict[int, str] = field(default_factory=dict)  # input index -> why it is flagged


@dataclass
class Parsed:
    """Every input checked and converted, except image pixels: their headers are read, so
    `pixels` (the request's total once decoded) is known before any is decoded."""

    x: np.ndarray
    kinds: list[str]
    spec: ImageInput | TabularInput
    max_request_pixels: int
    images: list[tuple[int, OpenedImage]] = field(default_factory=list)
    pixels: int = 0
    reasons: dict[int, str] = field(default_factory=dict)

    def add_image(self, index: int, img: OpenedImage) -> None:
        self.images.append((index, img))
        self.pixels += img.width * img.height
        if self.pixels > self.max_request_pixels:
            self.close()
            raise PixelBudgetExceeded(
                f"the request's images decode to more than {self.max_request_pixels} pixels, "
                f"the limit per request (inputs[0] to inputs[{index}] already make "
                f"{self.pixels}); send fewer or smaller images"
            )

    def close(self) -> None:
        for _, img in self.images:
            img.close()
        self.images = []


def parse_json(
    inputs: Sequence[ScoreInput], manifest: Manifest, max_pixels: int, max_request_pixels: int
) -> Parsed:
    spec = manifest.input
    x = np.empty((len(inputs), *spec.shape), dtype=np.float32)
    parsed = Parsed(x, [], spec, max_request_pixels)
    errors: list[str] = []
    for i, item in enumerate(inputs):
        parsed.kinds.append(item.kind)
        try:
            if item.image is not None:
                if not isinstance(spec, ImageInput):
                    raise InputError(_not_image(manifest))
                parsed.add_image(i, open_image(base64_image_bytes(item.image), spec, max_pixels))
            elif item.array is not None:
                parsed.x[i] = _array(item.array, spec)
            else:
                parsed.x[i], reason = _record(item.record or {}, manifest)
                if reason is not None:
                    parsed.reasons[i] = reason
        except InputError as e:
            errors.append(f"inputs[{i}]: {e}")
    return _checked(parsed, errors)


def parse_images(
    images: Sequence[bytes], manifest: Manifest, max_pixels: int, max_request_pixels: int
) -> Parsed:
    """Multipart uploads: raw PNG/JPEG bytes, in field order."""
    spec = manifest.input
    if not isinstance(spec, ImageInput):
        raise InputsInvalid([_not_image(manifest)])
    x = np.empty((len(images), *spec.shape), dtype=np.float32)
    parsed = Parsed(x, [], spec, max_request_pixels)
    errors: list[str] = []
    for i, data in enumerate(images):
        parsed.kinds.append("image")
        try:
            parsed.add_image(i, open_image(data, spec, max_pixels))
        except InputError as e:
            errors.append(f"inputs[{i}]: {e}")
    return _checked(parsed, errors)


def _checked(parsed: Parsed, errors: list[str]) -> Parsed:
    if errors:
        parsed.close()
        raise InputsInvalid(errors)
    return parsed


def decode(parsed: Parsed, deadline: float) -> Prepared:
    """Decode the parsed images into the batch within the request's deadline
    (`time.monotonic()`), checked before each image: a request past it stops, having
    cost at most one image's decoding beyond it. Closes `parsed`."""
    try:
        errors: list[str] = []
        for i, img in parsed.images:
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"the request's deadline passed while decoding its images "
                    f"(at inputs[{i}] of {len(parsed.kinds)})"
                )
            assert isinstance(parsed.spec, ImageInput), "parse_* only opens images for images"
            try:
                parsed.x[i] = decode_opened(img, parsed.spec)
            except InputError as e:
                errors.append(f"inputs[{i}]: {e}")
        if errors:
            raise InputsInvalid(errors)
        return Prepared(parsed.x, parsed.kinds, parsed.reasons)
    finally:
        parsed.close()


def _not_image(manifest: Manifest) -> str:
    return (
        f"model {manifest.name!r} takes tabular inputs "
        f"('record' or 'array' of {manifest.input.shape[0]} features), not images"
    )


def _array(value: list, spec: ImageInput | TabularInput) -> np.ndarray:
    return _checked_numbers(numeric_array(value, list(spec.shape)), spec)


def numeric_array(value: object, expected: list[int]) -> np.ndarray:
    """A JSON array of numbers as an integer or float array, refusing ragged lists,
    non-numbers and integers too large for a 32-bit float (`expected` is for messages)."""
    try:
        arr = np.asarray(value)
    except ValueError:
        raise InputError(f"expected array of shape {expected}, got a ragged nested list") from None
    if arr.dtype == object:
        # Python ints past int64 (JSON allows any integer) land here, as do nulls and objects.
        if list(arr.shape) == expected and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in arr.flat
        ):
            where = _first_huge(arr)
            if where is not None:
                raise InputError(_too_big(arr[where], where))
            arr = arr.astype(np.float64)
        else:
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
    return arr


def _checked_numbers(arr: np.ndarray, spec: ImageInput | TabularInput) -> np.ndarray:
    """One input's numbers, in the model's sample shape, finite, within float32 and the
    manifest's value range: the same checks for a JSON `array` and a v2 tensor row."""
    expected = list(spec.shape)
    if list(arr.shape) != expected:
        raise InputError(f"expected array of shape {expected}, got {list(arr.shape)}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError("array contains NaN or Inf")
        # Checked before the cast: float32 turns these into Inf, and a model into NaN.
        huge = np.abs(arr) > FLOAT32_MAX
        if huge.any():
            where = tuple(int(k) for k in np.argwhere(huge)[0])
            raise InputError(_too_big(arr[where], where))
    arr = arr.astype(np.float32)
    if spec.value_range is not None:
        lo, hi = spec.value_range
        amin, amax = float(arr.min()), float(arr.max())
        if amin < lo - RANGE_TOLERANCE or amax > hi + RANGE_TOLERANCE:
            raise InputError(
                f"expected values in [{lo:g}, {hi:g}] (scaled as in training), "
                f"got values from {amin:g} to {amax:g}"
            )
    return arr


def parse_tensor(batch: np.ndarray, manifest: Manifest) -> Parsed:
    """A batch that arrived as one numeric array [n, *sample_shape] (the KServe v2 `x`
    tensor): each row gets the checks of an `array` input, and errors name its index."""
    spec = manifest.input
    n = len(batch)
    parsed = Parsed(np.empty((n, *spec.shape), np.float32), ["array"] * n, spec, 0)
    if _valid_float32(batch, spec):
        parsed.x[...] = batch
        return parsed
    errors: list[str] = []
    for i in range(n):
        try:
            parsed.x[i] = _checked_numbers(batch[i], spec)
        except InputError as e:
            errors.append(f"inputs[{i}]: {e}")
    return _checked(parsed, errors)


def _valid_float32(batch: np.ndarray, spec: ImageInput | TabularInput) -> bool:
    """Whether every row of a float32 batch passes `_checked_numbers`, checked for the
    whole batch at once (a finite float32 always fits one; the value range holds for every
    row when it holds for the batch's extremes). False sends the batch through the row by
    row checks, which name each bad row."""
    if batch.dtype != np.float32 or not batch.size or batch.shape[1:] != spec.shape:
        return False
    if not np.isfinite(batch).all():
        return False
    if spec.value_range is None:
        return True
    lo, hi = spec.value_range
    return float(batch.min()) >= lo - RANGE_TOLERANCE and float(batch.max()) <= hi + RANGE_TOLERANCE


def _first_huge(arr: np.ndarray) -> tuple[int, ...] | None:
    """Where the first number too large for float32 is in an object array of numbers."""
    for where, v in np.ndenumerate(arr):
        try:
            huge = not abs(float(v)) <= FLOAT32_MAX
        except OverflowError:  # an integer too large even for float64
            huge = True
        if huge:
            return tuple(int(k) for k in where)
    return None


def _too_big(value: object, where: tuple[int, ...]) -> str:
    text = str(value)
    shown = f"an integer of {len(text)} digits" if len(text) > 24 else text
    return (
        f"array value at {list(where)} is {shown}, which does not fit a 32-bit float "
        f"(largest magnitude {FLOAT32_MAX:.4g})"
    )


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
