"""Users' own data under the `custom` protocol: an image folder with `normal/` and optionally
`anomalous/`, or a tabular .csv/.npz with an optional label column.

The split, and why: a user's normal rows are all training data except a validation share
(`val_fraction`), which selects the checkpoint and calibrates the threshold. Labelled
anomalies are never trained on. The test set is explicit: `test` (a second table or folder,
scored whole) if given; otherwise, only when the data holds labelled anomalies, those
anomalies plus a held-out `TEST_FRACTION` of the normals, so the metrics compare both
kinds; otherwise there is no test set and the metrics are null with the reason. Every
choice is written to `Splits.notes`, which `gansentry train` prints: nothing is carved
silently. The split is seeded with the training seed (`--seed`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gansentry.datafiles import (
    DataFileError,
    image_files,
    labelled_image_files,
    parse_labels,
    read_csv_table,
    read_npz_table,
)
from gansentry.manifest import ImageInput, TabularInput, TabularPreprocessing
from gansentry.preprocessing import InputError, decode_image, encode_columns, fit_tabular
from training.data.errors import DataError
from training.data.images import image_spec, most_common
from training.data.result import Splits

TEST_FRACTION = 0.2
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F", "P"}


def carve_normals(
    n: int, val_fraction: float, rng: np.random.RandomState, *, hold_out_test: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices over n normal samples: val is `val_fraction` of them;
    test is `TEST_FRACTION` only with `hold_out_test` (else empty); train is the rest."""
    need = 3 if hold_out_test else 2
    if n < need:
        parts = "train, validation and test" if hold_out_test else "train and validation"
        raise DataError(f"only {n} normal sample(s): need at least {need} for {parts}")
    order = rng.permutation(n)
    n_test = max(1, int(round(n * TEST_FRACTION))) if hold_out_test else 0
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_test - n_val < 1:
        n_test, n_val = int(hold_out_test), 1
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return np.sort(train), np.sort(val), np.sort(test)


def _cap(rows: np.ndarray, max_train: int | None, rng: np.random.RandomState) -> np.ndarray:
    if max_train is None or len(rows) <= max_train:
        return rows
    return np.sort(rows[rng.permutation(len(rows))[:max_train]])


def _split_notes(
    source: Path,
    *,
    what: str,
    split_seed: int,
    val_fraction: float,
    n_normal: int,
    n_train: int,
    n_val: int,
    n_anomalous: int,
    test: Path | None,
    n_test_normal: int,
    n_test_anomalous: int,
    max_train: int | None,
) -> list[str]:
    notes = [
        f"split seed {split_seed} (--seed): {n_val} of {n_normal} normal {what} "
        f"({val_fraction:.0%}, --val-fraction) for validation, {n_train} for training"
        + (f" (capped by --max-train {max_train})" if max_train is not None else "")
    ]
    if test is not None:
        notes.append(
            f"test set: every {what[:-1]} of {test} (--test): "
            f"{n_test_normal} normal, {n_test_anomalous} anomalous"
        )
        if n_anomalous:
            notes.append(
                f"{n_anomalous} anomalous {what} of {source} are not used: never trained on, "
                "and --test gives the test set"
            )
    elif n_anomalous:
        notes.append(
            f"no --test given: the test set is the {n_anomalous} anomalous {what} of {source} "
            f"plus {n_test_normal} held-out normal {what} ({TEST_FRACTION:.0%}), never trained on"
        )
    else:
        notes.append(
            f"no test set: {source} has no labelled anomalies and no --test was given, so "
            "AUROC and F1 will be null; give --test with labelled anomalies to measure them"
        )
    return notes


# ---------------------------------------------------------------- image folders


def _round_side(v: int) -> int:
    return int(min(1024, max(8, 4 * round(v / 4))))


def _decode_all(files: list[Path], spec: ImageInput) -> np.ndarray:
    """Every file through the service's own `decode_image`, so served scores match."""
    out = np.empty((len(files), *spec.shape), dtype=np.float32)
    for i, f in enumerate(files):
        try:
            out[i] = decode_image(f.read_bytes(), spec)
        except (InputError, OSError) as e:
            raise DataError(f"{f}: {e}") from e
    return out


def image_folder_test(path: Path, spec: ImageInput) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a folder, as a test set: (inputs, labels). A folder with normal/ and
    anomalous/ labels its files by those; any other folder's files count as normal."""
    if not path.is_dir():
        raise DataError(f"{path}: no such image folder")
    files, labels = labelled_image_files(path)
    if not files:
        raise DataError(f"{path}: no images (png, jpg, ...) found")
    return _decode_all(files, spec), (
        labels if labels is not None else np.zeros(len(files), np.int64)
    )


def image_folder_splits(
    path: Path,
    *,
    split_seed: int,
    val_fraction: float,
    max_train: int | None,
    image_size: int | None,
    channels: int | None,
    test: Path | None = None,
) -> Splits:
    """Images of any size and mode. Without `image_size`/`channels` the model takes the most
    common size (each side rounded to a multiple of 4) and the majority mode (grey or RGB)."""
    normal_files = image_files(path / "normal")
    anomalous_files = image_files(path / "anomalous")
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

    rng = np.random.RandomState(split_seed)
    hold_out = test is None and bool(anomalous_files)
    train, val, test_normal = carve_normals(
        len(normal_files), val_fraction, rng, hold_out_test=hold_out
    )
    train = _cap(train, max_train, rng)
    pick = lambda rows: [normal_files[i] for i in rows]  # noqa: E731
    if test is not None:
        x_test, y_test = image_folder_test(test, spec)
    else:
        test_files = pick(test_normal) + (anomalous_files if hold_out else [])
        x_test = _decode_all(test_files, spec)
        y_test = np.concatenate(
            [np.zeros(len(test_normal), np.int64), np.ones(len(test_files) - len(test_normal))]
        ).astype(np.int64)
    notes = _split_notes(
        path,
        what="images",
        split_seed=split_seed,
        val_fraction=val_fraction,
        n_normal=len(normal_files),
        n_train=len(train),
        n_val=len(val),
        n_anomalous=len(anomalous_files),
        test=test,
        n_test_normal=int((y_test == 0).sum()),
        n_test_anomalous=int(y_test.sum()),
        max_train=max_train,
    )
    return Splits(
        train=_decode_all(pick(train), spec),
        val=_decode_all(pick(val), spec),
        test=x_test,
        test_labels=y_test,
        input_spec=spec,
        dataset=str(path),
        protocol="custom",
        normal_classes=["normal"],
        anomalous_classes=["anomalous"] if y_test.any() else [],
        split_seed=split_seed,
        notes=notes,
    )


# ---------------------------------------------------------------- tabular


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class Table:
    """A table's raw feature columns (numeric as float64, symbolic as text) and labels
    (0 where the file has none; `labelled` says whether it had any)."""

    columns: dict[str, np.ndarray]
    symbolic: list[str]
    labels: np.ndarray
    classes: np.ndarray | None
    labelled: bool

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {n: v[rows] for n, v in self.columns.items()}

    def encode(self, rows: np.ndarray, prep: TabularPreprocessing) -> np.ndarray:
        if len(rows) == 0:  # no test set: nothing to encode
            return np.zeros((0, prep.num_features), np.float32)
        return encode_columns(self.take(rows), prep)


def read_csv(path: Path, label_column: str | None, symbolic_columns: list[str] | None) -> Table:
    """Symbolic columns default to those holding any non-numeric value; a blank or NaN in a
    numeric column is an error naming it."""
    try:
        table = read_csv_table(path)
        label_column = table.label_column(label_column)
        if label_column is not None:
            labels, classes = parse_labels(
                table.column(label_column), f"{path}: column {label_column!r}"
            )
        else:
            labels, classes = np.zeros(len(table.rows), dtype=np.int64), None
    except DataFileError as e:
        raise DataError(str(e)) from e
    columns = {h: table.column(h) for h in table.header if h != label_column}
    if not columns:
        raise DataError(f"{path}: no feature columns besides the label")

    if symbolic_columns is None:
        symbolic = [n for n, v in columns.items() if not all(_is_number(x) for x in v if x)]
    else:
        absent = [c for c in symbolic_columns if c not in columns]
        if absent:
            raise DataError(f"{path}: symbolic column(s) {absent} missing; columns: {table.header}")
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
                f"{path}: column {name!r} has a blank, NaN or Inf value on line "
                f"{table.lines[bad[0]]}"
            )
        out[name] = num
    return Table(out, symbolic, labels, classes, labelled=label_column is not None)


def read_npz(path: Path, label_column: str | None) -> Table:
    try:
        t = read_npz_table(path, label_column)
    except DataFileError as e:
        raise DataError(str(e)) from e
    labels = t.labels if t.labels is not None else np.zeros(len(t.x), dtype=np.int64)
    columns = {n: t.x[:, i] for i, n in enumerate(t.names)}
    return Table(columns, [], labels, t.classes, labelled=t.labels is not None)


def read_table(path: Path, label_column: str | None, symbolic_columns: list[str] | None) -> Table:
    if path.suffix.lower() == ".npz":
        if symbolic_columns:
            raise DataError(f"{path}: an NPZ holds numbers only; symbolic columns need a CSV")
        return read_npz(path, label_column)
    return read_csv(path, label_column, symbolic_columns)


def table_test(
    path: Path, prep: TabularPreprocessing, label_column: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Every row of a table, encoded with a model's fitted preprocessing, as a test set:
    (inputs, labels, classes). Its feature columns must be the model's raw columns."""
    if not path.is_file():
        raise DataError(f"{path}: no such table")
    symbolic = [c.name for c in prep.columns if c.kind == "symbolic"]
    table = read_table(path, label_column, symbolic or None)
    want = [c.name for c in prep.columns]
    missing = [c for c in want if c not in table.columns]
    extra = [c for c in table.columns if c not in want]
    if missing or extra:
        raise DataError(
            f"{path}: columns differ from the model's: missing {missing}, unexpected {extra}"
        )
    try:
        x = encode_columns(table.columns, prep)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from e
    return x, table.labels, table.classes


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
    test: Path | None = None,
) -> Splits:
    """Vocabularies and min-max scaling (of log(1 + v) for `log_columns`) are fitted on the
    train split alone; the test table (if any) is encoded with them."""
    table = read_table(path, label_column, symbolic_columns)
    normal = np.flatnonzero(table.labels == 0)
    anomalous = np.flatnonzero(table.labels == 1)
    rng = np.random.RandomState(split_seed)
    hold_out = test is None and len(anomalous) > 0
    train, val, test_normal = (
        normal[r] for r in carve_normals(len(normal), val_fraction, rng, hold_out_test=hold_out)
    )
    train = _cap(train, max_train, rng)

    try:
        prep = preprocessing or fit_tabular(
            table.take(train), table.symbolic, "minmax", log_columns=log_columns or ()
        )
        x_train, x_val = (table.encode(r, prep) for r in (train, val))
        if test is None:
            test_rows = np.concatenate([test_normal, anomalous]) if hold_out else test_normal
            x_test = table.encode(test_rows, prep)
            y_test = table.labels[test_rows]
            classes = None if table.classes is None else table.classes[test_rows]
    except ValueError as e:  # InputError included: a bad value, or a bad --log-columns name
        raise DataError(f"{path}: {e}") from e
    if test is not None:
        x_test, y_test, classes = table_test(test, prep, label_column)
    notes = _split_notes(
        path,
        what="rows",
        split_seed=split_seed,
        val_fraction=val_fraction,
        n_normal=len(normal),
        n_train=len(train),
        n_val=len(val),
        n_anomalous=len(anomalous),
        test=test,
        n_test_normal=int((y_test == 0).sum()),
        n_test_anomalous=int(y_test.sum()),
        max_train=max_train,
    )
    return Splits(
        train=x_train,
        val=x_val,
        test=x_test,
        test_labels=y_test,
        input_spec=TabularInput(
            num_features=prep.num_features,
            feature_names=prep.feature_names(),
            preprocessing=prep,
        ),
        dataset=str(path),
        protocol="custom",
        normal_classes=["normal"],
        anomalous_classes=["anomalous"] if y_test.any() else [],
        split_seed=split_seed,
        test_classes=classes,
        notes=notes,
    )


def whole_test_set(
    path: Path, spec: ImageInput | TabularInput, label_column: str | None = None
) -> Splits:
    """A table or image folder scored whole, as `gansentry evaluate --dataset PATH` does:
    every row is a test sample, nothing is re-split."""
    empty = np.zeros((0, *spec.shape), dtype=np.float32)
    classes = None
    if isinstance(spec, ImageInput):
        x, labels = image_folder_test(path, spec)
    else:
        if spec.preprocessing is None:
            raise DataError(f"{path}: the model has no record preprocessing to encode a table")
        x, labels, classes = table_test(path, spec.preprocessing, label_column)
    return Splits(
        train=empty,
        val=empty,
        test=x,
        test_labels=labels,
        input_spec=spec,
        dataset=str(path),
        protocol="custom",
        normal_classes=["normal"],
        anomalous_classes=["anomalous"] if labels.any() else [],
        split_seed=0,
        test_classes=classes,
        notes=[
            f"test set: every {'image' if isinstance(spec, ImageInput) else 'row'} of {path}: "
            f"{int((labels == 0).sum())} normal, {int(labels.sum())} anomalous (not re-split)"
        ],
    )
