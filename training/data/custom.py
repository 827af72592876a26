"""Users' own data under the `custom` protocol: an image folder with `normal/` and optionally
`anomalous/`, or a tabular .csv/.npz with an optional label column."""

from __future__ import annotations

import csv
import math
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gansentry.manifest import TabularInput, TabularPreprocessing
from gansentry.preprocessing import InputError, decode_image, encode_columns, fit_tabular
from training.data.cifar import IMAGE_EXTS
from training.data.errors import DataError
from training.data.images import image_spec, most_common
from training.data.result import Splits

TEST_FRACTION = 0.2
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F", "P"}
DEFAULT_LABEL_COLUMN = "label"
NORMAL_WORDS = {"0", "0.0", "normal", "false"}
PLAIN_LABELS = NORMAL_WORDS - {"normal"} | {"1", "1.0", "true"}
NPZ_FEATURE_KEYS = ("x", "X", "data", "features")
NPZ_LABEL_KEYS = ("y", "labels", "label")


def split_normals(
    n: int, val_fraction: float, rng: np.random.RandomState
) -> tuple[np.ndarray, ...]:
    """(train, val, test) indices over n normal samples: test 20%, val `val_fraction`."""
    if n < 3:
        raise DataError(f"only {n} normal sample(s): need at least 3 for train, val and test")
    order = rng.permutation(n)
    n_test = max(1, int(round(n * TEST_FRACTION)))
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_test - n_val < 1:
        n_test, n_val = 1, 1
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return np.sort(train), np.sort(val), np.sort(test)


def _cap(rows: np.ndarray, max_train: int | None, rng: np.random.RandomState) -> np.ndarray:
    if max_train is None or len(rows) <= max_train:
        return rows
    return np.sort(rows[rng.permutation(len(rows))[:max_train]])


# ---------------------------------------------------------------- image folders


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    )


def _round_side(v: int) -> int:
    return int(min(1024, max(8, 4 * round(v / 4))))


def image_folder_splits(
    path: Path,
    *,
    split_seed: int,
    val_fraction: float,
    max_train: int | None,
    image_size: int | None,
    channels: int | None,
) -> Splits:
    """Images of any size and mode. Without `image_size`/`channels` the model takes the most
    common size (each side rounded to a multiple of 4) and the majority mode (grey or RGB).
    Every file is decoded by the service's own `decode_image`, so served scores match."""
    normal_files = _image_files(path / "normal")
    anomalous_files = _image_files(path / "anomalous")
    if not normal_files:
        raise DataError(f"{path / 'normal'}: no images (png, jpg, ...) found")
    sizes, grey = [], 0
    for f in normal_files:
        try:
            with Image.open(f) as img:
                sizes.append((img.height, img.width))
                grey += img.mode in GREY_MODES
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{f}: cannot decode image ({type(e).__name__}: {e})") from e
    h, w = most_common(sizes)
    native = (_round_side(h), _round_side(w))
    spec = image_spec(native, 1 if grey * 2 > len(sizes) else 3, image_size, channels)

    def load(files: list[Path]) -> np.ndarray:
        out = np.empty((len(files), *spec.shape), dtype=np.float32)
        for i, f in enumerate(files):
            try:
                out[i] = decode_image(f.read_bytes(), spec)
            except (InputError, OSError) as e:
                raise DataError(f"{f}: {e}") from e
        return out

    rng = np.random.RandomState(split_seed)
    train, val, test = split_normals(len(normal_files), val_fraction, rng)
    train = _cap(train, max_train, rng)
    pick = lambda rows: [normal_files[i] for i in rows]  # noqa: E731
    return Splits(
        train=load(pick(train)),
        val=load(pick(val)),
        test=load(pick(test) + anomalous_files),
        test_labels=np.concatenate(
            [np.zeros(len(test), np.int64), np.ones(len(anomalous_files), np.int64)]
        ),
        input_spec=spec,
        dataset=str(path),
        protocol="custom",
        normal_classes=["normal"],
        anomalous_classes=["anomalous"] if anomalous_files else [],
        split_seed=split_seed,
    )


# ---------------------------------------------------------------- tabular


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _labels(values: list[str], where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """0/1 labels, or "normal" (any case, trailing '.' ignored) = 0 and anything else = 1;
    plus the label text as each sample's class (e.g. attack types), unless it is plain 0/1,
    so evaluation can say which kinds of anomaly a model misses."""
    stripped = [v.strip().rstrip(".") for v in values]
    if any(v == "" for v in stripped):
        raise DataError(f"{where}: empty label on line {stripped.index('') + 2}")
    lowered = [v.lower() for v in stripped]
    labels = np.array([0 if v in NORMAL_WORDS else 1 for v in lowered], dtype=np.int64)
    plain = set(lowered) <= PLAIN_LABELS
    return labels, None if plain else np.array(stripped)


def read_csv(
    path: Path, label_column: str | None, symbolic_columns: list[str] | None
) -> tuple[dict[str, np.ndarray], list[str], np.ndarray, np.ndarray | None]:
    """(raw columns, symbolic names, labels). Symbolic columns default to those holding any
    non-numeric value; a blank or NaN in a numeric column is an error naming it."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read CSV ({type(e).__name__}: {e})") from e
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header row and at least one record")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header) or "" in header:
        raise DataError(f"{path}: header has empty or repeated column names: {header}")
    for i, r in enumerate(rows[1:]):
        if len(r) != len(header):
            raise DataError(f"{path}: line {i + 2} has {len(r)} fields, header has {len(header)}")
    columns = {h: [r[j].strip() for r in rows[1:]] for j, h in enumerate(header)}

    if label_column is None and DEFAULT_LABEL_COLUMN in columns:
        label_column = DEFAULT_LABEL_COLUMN
    if label_column is not None:
        if label_column not in columns:
            raise DataError(f"{path}: label column {label_column!r} missing; columns: {header}")
        labels, classes = _labels(columns.pop(label_column), f"{path}: column {label_column!r}")
    else:
        labels, classes = np.zeros(len(rows) - 1, dtype=np.int64), None
    if not columns:
        raise DataError(f"{path}: no feature columns besides the label")

    if symbolic_columns is None:
        symbolic = [n for n, v in columns.items() if not all(_is_number(x) for x in v if x)]
    else:
        absent = [c for c in symbolic_columns if c not in columns]
        if absent:
            raise DataError(f"{path}: symbolic column(s) {absent} missing; columns: {header}")
        symbolic = list(symbolic_columns)
    out: dict[str, np.ndarray] = {}
    for name, values in columns.items():
        if name in symbolic:
            out[name] = np.array(values)
            continue
        try:
            num = np.array([float(v) if v else math.nan for v in values], dtype=np.float64)
        except ValueError as e:
            raise DataError(f"{path}: column {name!r} is not numeric ({e})") from e
        bad = np.flatnonzero(~np.isfinite(num))
        if len(bad):
            raise DataError(
                f"{path}: column {name!r} has a blank, NaN or Inf value on line {bad[0] + 2}"
            )
        out[name] = num
    return out, symbolic, labels, classes


def read_npz(
    path: Path, label_column: str | None
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None]:
    """Features from `x` (or X, data, features, or the only 2-D array), labels from `y` (or
    labels, label, or `label_column`), names from an optional `feature_names` array."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: cannot read NPZ ({type(e).__name__}: {e})") from e
    key = next((k for k in NPZ_FEATURE_KEYS if k in arrays), None)
    if key is None:
        two_d = [k for k, v in arrays.items() if v.ndim == 2]
        if len(two_d) != 1:
            raise DataError(f"{path}: no feature array named x; arrays: {sorted(arrays)}")
        key = two_d[0]
    x = arrays[key]
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: array {key!r} must be numeric [N, F], got {x.dtype} {x.shape}")
    x = x.astype(np.float64)
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        raise DataError(f"{path}: array {key!r} has NaN or Inf at row {bad[0][0]} col {bad[0][1]}")
    names = (
        [str(n) for n in arrays["feature_names"]]
        if "feature_names" in arrays
        else [f"f{i}" for i in range(x.shape[1])]
    )
    if len(names) != x.shape[1]:
        raise DataError(f"{path}: {len(names)} feature_names for {x.shape[1]} features")
    label_keys = (label_column,) if label_column else NPZ_LABEL_KEYS
    if label_column and label_column not in arrays:
        raise DataError(f"{path}: label array {label_column!r} missing; arrays: {sorted(arrays)}")
    lkey = next((k for k in label_keys if k in arrays), None)
    if lkey is None:
        labels, classes = np.zeros(len(x), dtype=np.int64), None
    else:
        y = arrays[lkey]
        if y.shape != (len(x),):
            raise DataError(f"{path}: labels {lkey!r} have shape {y.shape}, expected ({len(x)},)")
        labels, classes = _labels([str(v) for v in y.tolist()], f"{path}: array {lkey!r}")
    return {n: x[:, i] for i, n in enumerate(names)}, labels, classes


def tabular_splits(
    path: Path,
    *,
    split_seed: int,
    val_fraction: float,
    max_train: int | None,
    label_column: str | None,
    symbolic_columns: list[str] | None,
    log_columns: list[str] | None = None,
    preprocessing: TabularPreprocessing | None = None,
) -> Splits:
    """Normals (label 0) split 70/10/20; the test set adds every anomaly. Vocabularies and
    min-max scaling (of log(1 + v) for `log_columns`) are fitted on the train split alone."""
    if path.suffix.lower() == ".npz":
        if symbolic_columns:
            raise DataError(f"{path}: an NPZ holds numbers only; symbolic columns need a CSV")
        columns, labels, classes = read_npz(path, label_column)
        symbolic: list[str] = []
    else:
        columns, symbolic, labels, classes = read_csv(path, label_column, symbolic_columns)
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    rng = np.random.RandomState(split_seed)
    train, val, test = (normal[r] for r in split_normals(len(normal), val_fraction, rng))
    train = _cap(train, max_train, rng)
    test = np.concatenate([test, anomalous])

    def take(rows: np.ndarray) -> dict[str, np.ndarray]:
        return {n: v[rows] for n, v in columns.items()}

    try:
        prep = preprocessing or fit_tabular(
            take(train), symbolic, "minmax", log_columns=log_columns or ()
        )
        x_train, x_val, x_test = (encode_columns(take(r), prep) for r in (train, val, test))
    except ValueError as e:  # InputError included: a bad value, or a bad --log-columns name
        raise DataError(f"{path}: {e}") from e
    return Splits(
        train=x_train,
        val=x_val,
        test=x_test,
        test_labels=labels[test],
        input_spec=TabularInput(
            num_features=prep.num_features,
            feature_names=prep.feature_names(),
            preprocessing=prep,
        ),
        dataset=str(path),
        protocol="custom",
        normal_classes=["normal"],
        anomalous_classes=["anomalous"] if len(anomalous) else [],
        split_seed=split_seed,
        test_classes=None if classes is None else classes[test],
    )
