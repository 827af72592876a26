"""Input preprocessing shared by training and serving.

Training loaders and the service both turn raw inputs into model inputs through these
functions, so a digit scored by `POST /score` sees exactly the pixels `gansentry
evaluate` saw, and a KDD record the same one-hot and scaling."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import pyspng
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
    return _scaled(np.asarray(image))


def pixels_to_array(pixels: np.ndarray, spec: ImageInput) -> np.ndarray:
    """uint8 [H, W] (grey) or [H, W, 3] (RGB) pixels -> the model input, as
    `image_to_array` makes it from the same pixels as a PIL image."""
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if pixels.shape[:2] == (spec.height, spec.width) and channels == spec.channels:
        return _scaled(pixels)
    return image_to_array(Image.fromarray(pixels), spec)


def _scaled(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] -> float32 [C, H, W] in [0, 1]."""
    arr = pixels.astype(np.float32) / 255.0
    if arr.ndim == 2:
        return arr[None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


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

# Small PNGs that need no conversion (8-bit grey for a one-channel model, 8-bit RGB for a
# three-channel one) decode through libspng (pyspng) rather than Pillow. For a 28x28
# digit, Pillow's per-image Python work (a file object, the chunk walk, a decoder, reading
# the pixels out) takes about ten times the decoding itself, and on the event loop it was
# the largest part of a single-image request. PNG is lossless, so both give the same
# pixels. Everything else, and large images (Pillow releases the GIL while decoding,
# pyspng does not, and a request's many pixels decode in a thread beside the event loop),
# goes through Pillow.
PLAIN_PNG_MAX_PIXELS = 128 * 128
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {1: 0, 3: 2}  # model channels -> PNG colour type: grey, truecolour


@dataclass(frozen=True)
class PlainPng:
    """A small 8-bit PNG in the model's channel layout, its header read (`open_image`)."""

    data: bytes
    width: int
    height: int
    channels: int

    def close(self) -> None:
        """Nothing to release; here so that opened images of either kind close alike."""


OpenedImage = Image.Image | PlainPng


def _plain_png(data: bytes, channels: int) -> PlainPng | None:
    """The image as a `PlainPng` when its header (signature, then IHDR: width, height,
    bit depth, colour type) says it is one."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    if depth != 8 or color != _PNG_COLOR_TYPES.get(channels):
        return None
    if not 0 < width * height <= PLAIN_PNG_MAX_PIXELS:
        return None
    return PlainPng(data, width, height, channels)


def _pillow_open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise InputError(f"image has more pixels than the limit of {max_pixels}") from e
    except UnidentifiedImageError as e:
        raise InputError(NOT_AN_IMAGE) from e
    except _DECODE_ERRORS as e:
        raise InputError(CORRUPT_IMAGE) from e


def open_image(data: bytes, spec: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> OpenedImage:
    """Encoded PNG/JPEG bytes -> a lazily opened image: only the header is read, so its
    size is known, and checked against `max_pixels`, before any pixel data is decoded (a
    decompression bomb costs nothing). Decode it with `decode_opened`, which closes it."""
    img = _plain_png(data, spec.channels) or _pillow_open(data, max_pixels)
    w, h = img.width, img.height
    if w * h > max_pixels:
        img.close()
        raise InputError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    return img


def decode_opened(img: OpenedImage, spec: ImageInput) -> np.ndarray:
    """Decode an image from `open_image` into the model input, and close it."""
    if isinstance(img, PlainPng):
        try:
            pixels = pyspng.load(img.data, "L" if img.channels == 1 else "RGB")
        except RuntimeError:
            # libspng refused it: Pillow's verdict and message stand, as for any image.
            return decode_opened(_pillow_open(img.data, img.width * img.height), spec)
        return pixels_to_array(pixels, spec)
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
    return decode_opened(open_image(data, spec, max_pixels), spec)


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
#
# Symbolic values are matched by what they mean, not by how a client's JSON library wrote
# them: a flow collector sends KDD's `logged_in` as the number 1 (or 1.0, or true) where the
# training file wrote the text "1", and all of them must hit the same one-hot slot. Each
# value and each vocabulary entry is reduced to a canonical key (`category_key`):
# - numbers (JSON numbers and strings that spell a decimal number) by numeric value, so
#   1, 1.0, "1" and "1.0" are one key, and 0.5 is another;
# - booleans, and the words true/false in any case, as the numbers 1 and 0;
# - any other string exactly as written (case and whitespace count).
# A value whose text is itself a vocabulary entry matches that entry first, so a vocabulary
# holding both "01" and "1" keeps them apart for clients that send text.

FLOAT32_MAX = float(np.finfo(np.float32).max)
# How far outside its training range a numeric field may lie and still be scored as data,
# in training ranges (min-max scaling: the scaled feature must lie in [-1000, 1001];
# standard scaling or none: |feature| <= 1000). Real traffic drifts well past the training
# range: KDD99's own held-out half reaches 23 training ranges (num_compromised), so a
# tight limit would refuse ordinary records. A thousand leaves forty times that margin,
# keeps every feature small enough that no shipped graph overflows float32, and still
# refuses the values that are not data (src_bytes = 1e30 is 1.4e21 ranges out).
RANGE_LIMIT = 1000.0
UNKNOWN_POLICIES = ("reject", "anomaly")

_INTEGER = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_WORDS = {"true": 1, "false": 0}

CategoryKey = tuple[str, object]


def category_key(value: object) -> CategoryKey | None:
    """The canonical form symbolic values are matched by (see the comment above); None for
    a value that cannot be a category (null, NaN, a list or an object)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return ("num", int(value))
    if isinstance(value, int):
        return ("num", value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return ("num", int(value) if value.is_integer() else value)
    if isinstance(value, str):
        try:
            if _INTEGER.fullmatch(value):
                return ("num", int(value))
            if _DECIMAL.fullmatch(value):
                return category_key(float(value))
        except ValueError:  # an integer too long for int(): not a number anyone means
            return ("str", value)
        word = _WORDS.get(value.lower())
        return ("num", word) if word is not None else ("str", value)
    return None


def category_text(key: CategoryKey) -> str:
    """How a fitted vocabulary writes a non-text category: integers without a decimal point
    ("1", not "1.0"), other numbers as Python's shortest round-trip repr."""
    kind, v = key
    return str(v) if kind == "str" or isinstance(v, int) else repr(float(v))  # type: ignore[arg-type]


def _fit_key(value: object) -> CategoryKey:
    # Training data may hold NaN or None (an empty NPZ cell): a category of its own, as before.
    return category_key(value) or ("str", str(value))


def _vocabulary(values: Sequence[object] | np.ndarray) -> list[str]:
    """Distinct categories of a training column: every distinct text as written (a file
    that wrote both "01" and "1" has two categories), and each number or boolean that no
    text already means, in `category_text` form."""
    distinct = set(values.tolist() if isinstance(values, np.ndarray) else values)
    texts = {v for v in distinct if isinstance(v, str)}
    _, by_key = _vocab_index(tuple(sorted(texts)))
    for v in distinct:
        if not isinstance(v, str):
            key = _fit_key(v)
            if key not in by_key:
                texts.add(category_text(key))
    return sorted(texts)


@lru_cache(maxsize=1024)
def _vocab_index(vocab: tuple[str, ...]) -> tuple[dict[str, int], dict[CategoryKey, int]]:
    """(exact text -> slot, canonical key -> slot). Entries that share a key ("1" and
    "1.0") give the key to the one written in canonical form."""
    exact = {text: i for i, text in enumerate(vocab)}
    by_key: dict[CategoryKey, int] = {}
    for i, text in enumerate(vocab):
        key = _fit_key(text)
        if key not in by_key or (text == category_text(key) != vocab[by_key[key]]):
            by_key[key] = i
    return exact, by_key


def _slot(value: object, exact: dict[str, int], by_key: dict[CategoryKey, int]) -> int | None:
    if isinstance(value, str):
        i = exact.get(value)
        if i is not None:
            return i
    key = category_key(value)
    if key is None:
        return exact.get(str(value))
    return by_key.get(key)


def fit_tabular(
    columns: Mapping[str, Sequence[object] | np.ndarray],
    symbolic: Sequence[str],
    scaling: str = "minmax",
    vocabularies: Mapping[str, Sequence[object]] | None = None,
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
                given = vocabularies[name]
                vocab = [v if isinstance(v, str) else category_text(_fit_key(v)) for v in given]
            else:
                vocab = _vocabulary(values)
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
    """Raw columns (name -> values, all the same length) -> float32 [N, F] model features.
    This is the dataset path (training, evaluation): a category the vocabulary lacks encodes
    as all zeros, as the model saw it in evaluation. Served records go through
    `screen_record`, which says so instead."""
    missing = [c.name for c in prep.columns if c.name not in columns]
    if missing:
        raise InputError(f"missing column(s): {', '.join(missing)}")
    parts: list[np.ndarray] = []
    for col in prep.columns:
        values = columns[col.name]
        if col.kind == "symbolic":
            exact, by_key = _vocab_index(tuple(col.vocabulary or ()))
            seq = values.tolist() if isinstance(values, np.ndarray) else values
            codes = np.array([_slot(v, exact, by_key) for v in seq], dtype=object)
            seen = np.array([c is not None for c in codes], dtype=bool)
            onehot = np.zeros((len(codes), col.width), dtype=np.float64)
            onehot[np.nonzero(seen)[0], codes[seen].astype(np.int64)] = 1.0
            parts.append(onehot)
        else:
            try:
                num = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError, OverflowError) as e:
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


ProblemKind = Literal["unknown_category", "wrong_type", "out_of_range"]


@dataclass(frozen=True)
class ValueProblem:
    """A record value the model does not know; the model's `unknown_policy` decides whether
    it is refused or scored as an anomaly."""

    field: str
    value: object
    kind: ProblemKind
    detail: str

    @property
    def message(self) -> str:
        return f"field {self.field!r} = {show_value(self.value)} {self.detail}"


@dataclass(frozen=True)
class ScreenedRecord:
    """A record's features and what was wrong with its values. Under the `anomaly` policy
    the features are still scored: an unseen category as all zeros, a value past the range
    limit clipped to it (so the graph sees finite, bounded numbers)."""

    x: np.ndarray  # float32 [F]
    problems: tuple[ValueProblem, ...] = ()

    @property
    def reason(self) -> str | None:
        return "; ".join(p.message for p in self.problems) or None

    def verdict(self, policy: str) -> str | None:
        """None for a clean record; the reason it is an anomaly under `anomaly`; under
        `reject` an InputError naming every bad field and value."""
        reason = self.reason
        if reason is not None and policy != "anomaly":
            raise InputError(reason)
        return reason


def show_value(value: object, limit: int = 60) -> str:
    """A value as an error message quotes it: short, and safe for integers too long for
    Python to print (a JSON number may have any number of digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"{'-' if value < 0 else ''}<an integer of about {digits} digits>"
    if isinstance(value, float):
        return f"{value:.7g}"
    text = json.dumps(value) if isinstance(value, str | bool) or value is None else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class _NumericSlot:
    name: str
    at: int
    log1p: bool


@dataclass(frozen=True)
class _SymbolicSlot:
    name: str
    at: int
    vocabulary: tuple[str, ...]
    exact: dict[str, int]
    by_key: dict[CategoryKey, int]


@dataclass(frozen=True)
class _Layout:
    slots: tuple[_NumericSlot | _SymbolicSlot, ...]
    names: frozenset[str]
    offset: tuple[float, ...]
    scale: tuple[float, ...]
    base: tuple[float, ...]  # every feature's value for a raw 0 (an empty one-hot)
    lo: float
    hi: float


_LAYOUTS: dict[int, tuple[TabularPreprocessing, _Layout]] = {}


def _layout(prep: TabularPreprocessing) -> _Layout:
    """Per-preprocessing lookup tables, built once: a served record is encoded field by
    field in plain Python, which on one record is several times faster than numpy."""
    hit = _LAYOUTS.get(id(prep))
    if hit is not None and hit[0] is prep:
        return hit[1]
    slots: list[_NumericSlot | _SymbolicSlot] = []
    at = 0
    for col in prep.columns:
        if col.kind == "symbolic":
            vocab = tuple(col.vocabulary or ())
            exact, by_key = _vocab_index(vocab)
            slots.append(_SymbolicSlot(col.name, at, vocab, exact, by_key))
        else:
            slots.append(_NumericSlot(col.name, at, col.transform == "log1p"))
        at += col.width
    hi = 1.0 + RANGE_LIMIT if prep.scaling == "minmax" else RANGE_LIMIT
    layout = _Layout(
        slots=tuple(slots),
        names=frozenset(c.name for c in prep.columns),
        offset=tuple(prep.offset),
        scale=tuple(prep.scale),
        base=tuple((0.0 - o) / s for o, s in zip(prep.offset, prep.scale, strict=True)),
        lo=-RANGE_LIMIT,
        hi=hi,
    )
    if len(_LAYOUTS) >= 256:
        _LAYOUTS.clear()
    _LAYOUTS[id(prep)] = (prep, layout)
    return layout


def _far_detail(prep: TabularPreprocessing, slot: _NumericSlot, f: float) -> str:
    """Why a scaled feature `f` is refused, in the field's own units."""
    off, sc = prep.offset[slot.at], prep.scale[slot.at]
    limit = f"(the limit is {RANGE_LIMIT:g})"
    if prep.scaling == "minmax":
        a, b = off, off + sc
        if slot.log1p:
            a, b = math.expm1(a), math.expm1(b)
        away = f - 1.0 if f > 1.0 else -f
        where = f"the training range [{a:.6g}, {b:.6g}]"
        unit = "training ranges of log(1 + v)" if slot.log1p else "training ranges"
        return f"lies {away:.3g} {unit} outside {where} {limit}"
    if prep.scaling == "standard":
        of = "log(1 + v)" if slot.log1p else "the value"
        return f"lies {abs(f):.3g} standard deviations of {of} from its training mean {limit}"
    return f"is past +-{RANGE_LIMIT:g}, the limit for a model without fitted scaling"


def screen_record(record: Mapping[str, object], prep: TabularPreprocessing) -> ScreenedRecord:
    """One raw record (field -> value) -> its float32 features and the values the model
    does not know (unseen categories, symbolic values of the wrong type, numbers that do
    not fit float32 or lie more than RANGE_LIMIT training ranges outside the training
    range). Raises InputError for what no policy can score: unknown or missing fields,
    and numeric fields that are not numbers (or NaN, or negative where log-scaled)."""
    layout = _layout(prep)
    unknown = [k for k in record if k not in layout.names]
    if unknown:
        raise InputError(f"unknown field(s): {', '.join(map(str, unknown))}")
    x = list(layout.base)
    offset, scale, lo, hi = layout.offset, layout.scale, layout.lo, layout.hi
    problems: list[ValueProblem] = []
    for slot in layout.slots:
        name = slot.name
        if name not in record:
            raise InputError(f"missing field {name!r}")
        v = record[name]
        kind = type(v)
        if isinstance(slot, _SymbolicSlot):
            # Fast paths for what clients send (text, integers); the rest in _category.
            if kind is str:
                i = slot.exact.get(v)  # type: ignore[call-overload]
            elif kind is int:
                i = slot.by_key.get(("num", v))
            else:
                i = None
            if i is None:
                i = _category(name, v, slot, problems)
                if i is None:
                    continue
            j = slot.at + i
            x[j] = (1.0 - offset[j]) / scale[j]
            continue
        if kind is not float and kind is not int:
            v = _number(name, v)
        if v != v or v == math.inf or v == -math.inf:
            raise InputError(f"field {name!r} is NaN or Inf")
        j = slot.at
        if not -FLOAT32_MAX <= v <= FLOAT32_MAX:  # huge integers too, never made a float
            problems.append(ValueProblem(name, v, "out_of_range", "does not fit in a 32-bit float"))
            x[j] = hi if v > 0 else lo  # type: ignore[operator]
            continue
        t = float(v)  # type: ignore[arg-type]
        if slot.log1p:
            if t < 0:
                raise InputError(f"field {name!r} is log-scaled and needs values >= 0, got {t:g}")
            t = float(np.log1p(t))
        f = (t - offset[j]) / scale[j]
        if not lo <= f <= hi:
            problems.append(ValueProblem(name, v, "out_of_range", _far_detail(prep, slot, f)))
            f = min(max(f, lo), hi)
        x[j] = f
    return ScreenedRecord(np.asarray(x, dtype=np.float64).astype(np.float32), tuple(problems))


def _category(
    name: str, v: object, slot: _SymbolicSlot, problems: list[ValueProblem]
) -> int | None:
    """The vocabulary slot of a symbolic value off the fast path, or None after noting why
    there is none."""
    if isinstance(v, np.generic):
        v = v.item()
    if category_key(v) is None or isinstance(v, float) and math.isinf(v):
        problems.append(
            ValueProblem(name, v, "wrong_type", "is not a category (a string, number or boolean)")
        )
        return None
    i = _slot(v, slot.exact, slot.by_key)
    if i is None:
        vocab = slot.vocabulary
        known = ", ".join(vocab[:8]) + (f", ... ({len(vocab)} in all)" if len(vocab) > 8 else "")
        problems.append(
            ValueProblem(
                name, v, "unknown_category", f"is not a category seen in training ({known})"
            )
        )
    return i


def _number(name: str, v: object) -> int | float:
    if isinstance(v, np.generic) and not isinstance(v, np.bool_):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InputError(f"field {name!r} must be a number, got {type(v).__name__}")
    return v


def encode_record(record: Mapping[str, object], prep: TabularPreprocessing) -> np.ndarray:
    """One raw record -> float32 [F], refusing (InputError naming the field and value) any
    value the model does not know, whatever the model's policy: unknown or missing fields,
    unseen categories, out-of-range numbers. A silently dropped field or category is a
    silently wrong score."""
    screened = screen_record(record, prep)
    screened.verdict("reject")
    return screened.x
