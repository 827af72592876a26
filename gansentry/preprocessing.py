"""Input preprocessing shared by training and serving.

Training loaders and the service both turn raw inputs into model inputs through these
functions, so a digit scored by `POST /score` sees exactly the pixels `gansentry
evaluate` saw, and a KDD record the same one-hot and scaling."""

from __future__ import annotations

import base64
import io
import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from gansentry.manifest import Column, ImageInput, TabularPreprocessing

RESAMPLE = Image.Resampling.BILINEAR
DEFAULT_MAX_PIXELS = 16_000_000


class InputError(ValueError):
    """A single input is unusable; the message says why, in words fit for an API client."""


# ---------------------------------------------------------------- images


def image_to_array(image: Image.Image, spec: ImageInput) -> np.ndarray:
    """PIL image of any mode and size -> float32 [C, H, W] in [0, 1] at the model's size."""
    mode = "L" if spec.channels == 1 else "RGB"
    if image.mode != mode:
        if image.mode in ("RGBA", "LA", "P") and mode == "L":
            image = image.convert("RGBA").convert("L")
        image = image.convert(mode)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), RESAMPLE)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def uint8_batch_to_array(images: np.ndarray, spec: ImageInput) -> np.ndarray:
    """uint8 [N, H, W] or [N, H, W, C] -> float32 [N, C, H, W] through `image_to_array`,
    the very path the service takes for a decoded PNG."""
    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
    if (h, w) == (spec.height, spec.width) and c == spec.channels:
        return (images.astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy()
    out = np.empty((n, *spec.shape), dtype=np.float32)
    for i in range(n):
        img = images[i, :, :, 0] if c == 1 else images[i]
        out[i] = image_to_array(Image.fromarray(img), spec)
    return out


NOT_AN_IMAGE = "cannot decode image: not a PNG, JPEG or other image format the server reads"
CORRUPT_IMAGE = "cannot decode image: its data is truncated or corrupt"
# What Pillow raises for bytes it cannot parse. Its messages carry object reprs
# (`<_io.BytesIO object at 0x...>`) and decoder internals, so clients get the fixed
# messages above and the original stays chained for the server's log.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded PNG/JPEG bytes -> a lazily opened image: only the header is read, so its
    size is known, and checked against `max_pixels`, before any pixel data is decoded (a
    decompression bomb costs nothing). Decode it with `decode_opened`, which closes it."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise InputError(f"image has more pixels than the limit of {max_pixels}") from e
    except UnidentifiedImageError as e:
        raise InputError(NOT_AN_IMAGE) from e
    except _DECODE_ERRORS as e:
        raise InputError(CORRUPT_IMAGE) from e
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise InputError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    return img


def decode_opened(img: Image.Image, spec: ImageInput) -> np.ndarray:
    """Decode an image from `open_image` into the model input, and close it."""
    try:
        with img:
            img.load()
            return image_to_array(img, spec)
    except Image.DecompressionBombError as e:
        raise InputError(CORRUPT_IMAGE) from e
    except _DECODE_ERRORS as e:
        raise InputError(CORRUPT_IMAGE) from e


def decode_image(data: bytes, spec: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> model input. Refuses images over `max_pixels` before
    decoding the pixel data, so a decompression bomb costs nothing."""
    return decode_opened(open_image(data, max_pixels), spec)


def base64_image_bytes(text: str) -> bytes:
    """A base64 image as sent in JSON (a `data:` URL prefix is accepted) -> its bytes."""
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as e:
        raise InputError(f"image is not valid base64: {e}") from e


def decode_base64_image(
    text: str, spec: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    return decode_image(base64_image_bytes(text), spec, max_pixels)


def array_to_png(arr: np.ndarray) -> bytes:
    """float [C, H, W] in [0, 1] -> PNG bytes (grey for 1 channel, RGB for 3)."""
    pixels = np.clip(np.rint(np.asarray(arr, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    img = (
        Image.fromarray(pixels[0])
        if pixels.shape[0] == 1
        else Image.fromarray(pixels.transpose(1, 2, 0))
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def array_to_base64_png(arr: np.ndarray) -> str:
    return base64.b64encode(array_to_png(arr)).decode("ascii")


# ---------------------------------------------------------------- tabular


def fit_tabular(
    columns: Mapping[str, Sequence[object] | np.ndarray],
    symbolic: Sequence[str],
    scaling: str = "minmax",
    vocabularies: Mapping[str, Sequence[str]] | None = None,
    log_columns: Sequence[str] = (),
) -> TabularPreprocessing:
    """Learn vocabularies and scaling from the training split's raw columns (in order).
    `vocabularies` fixes a symbolic column's categories up front (a published encoding such
    as KDD99's 121 features lists categories the training split may lack); `log_columns`
    are numeric columns scaled as log(1 + v)."""
    bad = [c for c in log_columns if c not in columns or c in symbolic]
    if bad:
        raise ValueError(f"log-scaled column(s) {bad} must be numeric columns of the table")
    specs: list[Column] = []
    for name, values in columns.items():
        if name in symbolic:
            if vocabularies and name in vocabularies:
                vocab = [str(v) for v in vocabularies[name]]
            else:
                vocab = sorted({str(v) for v in values})
            specs.append(Column(name=name, kind="symbolic", vocabulary=vocab))
        else:
            transform = "log1p" if name in log_columns else "none"
            specs.append(Column(name=name, kind="numeric", transform=transform))
    unscaled = TabularPreprocessing(
        columns=specs,
        scaling="none",
        offset=[0.0] * sum(c.width for c in specs),
        scale=[1.0] * sum(c.width for c in specs),
    )
    x = encode_columns(columns, unscaled)
    if scaling == "minmax":
        lo, hi = x.min(axis=0), x.max(axis=0)
        offset, scale = lo, np.where(hi - lo > 0, hi - lo, 1.0)
    elif scaling == "standard":
        mu, sd = x.mean(axis=0), x.std(axis=0)
        offset, scale = mu, np.where(sd > 0, sd, 1.0)
    elif scaling == "none":
        offset, scale = np.zeros(x.shape[1]), np.ones(x.shape[1])
    else:
        raise ValueError(f"unknown scaling {scaling!r}; choose minmax, standard or none")
    return TabularPreprocessing(
        columns=specs,
        scaling=scaling,  # type: ignore[arg-type]
        offset=[float(v) for v in offset],
        scale=[float(v) for v in scale],
    )


def encode_columns(
    columns: Mapping[str, Sequence[object] | np.ndarray], prep: TabularPreprocessing
) -> np.ndarray:
    """Raw columns (name -> values, all the same length) -> float32 [N, F] model features."""
    missing = [c.name for c in prep.columns if c.name not in columns]
    if missing:
        raise InputError(f"missing column(s): {', '.join(missing)}")
    parts: list[np.ndarray] = []
    for col in prep.columns:
        values = columns[col.name]
        if col.kind == "symbolic":
            index = {v: i for i, v in enumerate(col.vocabulary or [])}
            codes = np.array([index.get(str(v), -1) for v in values])
            onehot = np.zeros((len(codes), col.width), dtype=np.float64)
            seen = codes >= 0
            onehot[np.nonzero(seen)[0], codes[seen]] = 1.0
            parts.append(onehot)
        else:
            try:
                num = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise InputError(f"column {col.name!r} must be numeric: {e}") from e
            if not np.all(np.isfinite(num)):
                raise InputError(f"column {col.name!r} contains NaN or Inf")
            if col.transform == "log1p":
                if np.any(num < 0):
                    raise InputError(
                        f"column {col.name!r} is log-scaled and needs values >= 0, "
                        f"got {num.min():g}"
                    )
                num = np.log1p(num)
            parts.append(num.reshape(-1, 1))
    x = np.concatenate(parts, axis=1)
    x = (x - np.asarray(prep.offset)) / np.asarray(prep.scale)
    return x.astype(np.float32)


def encode_record(record: Mapping[str, object], prep: TabularPreprocessing) -> np.ndarray:
    """One raw record (field -> value) -> float32 [F]. Unknown or missing fields are errors
    naming the field, because a silently dropped field is a silently wrong score."""
    known = {c.name for c in prep.columns}
    unknown = [k for k in record if k not in known]
    if unknown:
        raise InputError(f"unknown field(s): {', '.join(map(str, unknown))}")
    for col in prep.columns:
        if col.name not in record:
            raise InputError(f"missing field {col.name!r}")
        v = record[col.name]
        if col.kind == "numeric":
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise InputError(f"field {col.name!r} must be a number, got {type(v).__name__}")
            if not math.isfinite(v):
                raise InputError(f"field {col.name!r} is NaN or Inf")
    return encode_columns({k: [v] for k, v in record.items()}, prep)[0]
