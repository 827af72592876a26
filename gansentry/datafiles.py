"""Users' own data files, as both `gansentry train` and `gansentry score` read them: a CSV
with a header row, an NPZ with a feature array, an image folder. One reader per format,
so a label column, an NPZ key or an image extension means the same thing to training and
to offline scoring. Errors are `DataFileError`s naming the file and the line or field."""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_LABEL_COLUMN = "label"
NORMAL_WORDS = frozenset({"0", "0.0", "normal", "false"})
PLAIN_LABELS = NORMAL_WORDS - {"normal"} | {"1", "1.0", "true"}
NPZ_FEATURE_KEYS = ("x", "X", "data", "features")
NPZ_LABEL_KEYS = ("y", "labels", "label")
# An image folder laid out for training: normal/ and anomalous/ give each file its label.
LABEL_FOLDERS = {"normal": 0, "anomalous": 1}


class DataFileError(ValueError):
    """A data file is unreadable or malformed; the message names the file and the place."""


def image_files(folder: Path) -> list[Path]:
    """Every image under `folder` (recursively, hidden files skipped), in sorted order."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    )


def labelled_image_files(folder: Path) -> tuple[list[Path], np.ndarray | None]:
    """(files, labels): a folder with normal/ and/or anomalous/ gives the files of both,
    labelled 0 and 1; any other folder gives all its images, unlabelled (None)."""
    if any((folder / name).is_dir() for name in LABEL_FOLDERS):
        files, labels = [], []
        for name, label in LABEL_FOLDERS.items():
            found = image_files(folder / name)
            files += found
            labels += [label] * len(found)
        return files, np.array(labels, dtype=np.int64)
    return image_files(folder), None


def parse_labels(values: Sequence[str], where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """0/1 labels, or "normal" (any case, trailing '.' ignored) = 0 and anything else = 1;
    plus the label text as each row's class (e.g. attack types), unless it is plain 0/1,
    so evaluation can say which kinds of anomaly a model misses."""
    stripped = [str(v).strip().rstrip(".") for v in values]
    if "" in stripped:
        raise DataFileError(f"{where}: empty label on data row {stripped.index('') + 1}")
    lowered = [v.lower() for v in stripped]
    labels = np.array([0 if v in NORMAL_WORDS else 1 for v in lowered], dtype=np.int64)
    plain = set(lowered) <= PLAIN_LABELS
    return labels, None if plain else np.array(stripped)


@dataclass
class CsvTable:
    """A CSV's header and its data rows as stripped text (blank lines dropped); `lines`
    holds each row's line number in the file, for error messages."""

    path: Path
    header: list[str]
    rows: list[list[str]]
    lines: list[int]

    def column(self, name: str) -> list[str]:
        j = self.header.index(name)
        return [r[j] for r in self.rows]

    def label_column(self, requested: str | None) -> str | None:
        """`requested` (which must exist), else a column named "label" if there is one."""
        if requested is not None:
            if requested not in self.header:
                raise DataFileError(
                    f"{self.path}: label column {requested!r} missing; columns: {self.header}"
                )
            return requested
        return DEFAULT_LABEL_COLUMN if DEFAULT_LABEL_COLUMN in self.header else None


def read_csv_table(path: Path) -> CsvTable:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            numbered = [(i + 1, r) for i, r in enumerate(csv.reader(f))]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataFileError(f"{path}: cannot read CSV ({type(e).__name__}: {e})") from e
    numbered = [(n, r) for n, r in numbered if any(c.strip() for c in r)]
    if len(numbered) < 2:
        raise DataFileError(f"{path}: needs a header row and at least one record")
    header = [h.strip() for h in numbered[0][1]]
    if len(set(header)) != len(header) or "" in header:
        raise DataFileError(f"{path}: header has empty or repeated column names: {header}")
    for n, r in numbered[1:]:
        if len(r) != len(header):
            raise DataFileError(f"{path}: line {n} has {len(r)} fields, header has {len(header)}")
    return CsvTable(
        path=path,
        header=header,
        rows=[[c.strip() for c in r] for _, r in numbered[1:]],
        lines=[n for n, _ in numbered[1:]],
    )


@dataclass
class NpzTable:
    """Features [N, F] as float64 with their names, and the labels if the file has any."""

    x: np.ndarray
    names: list[str]
    labels: np.ndarray | None
    classes: np.ndarray | None


def read_npz_table(path: Path, label_column: str | None) -> NpzTable:
    """Features from `x` (or X, data, features, or the only 2-D array), labels from `y` (or
    labels, label, or `label_column`), names from an optional `feature_names` array."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataFileError(f"{path}: cannot read NPZ ({type(e).__name__}: {e})") from e
    key = next((k for k in NPZ_FEATURE_KEYS if k in arrays), None)
    if key is None:
        two_d = [k for k, v in arrays.items() if v.ndim == 2]
        if len(two_d) != 1:
            raise DataFileError(f"{path}: no feature array named x; arrays: {sorted(arrays)}")
        key = two_d[0]
    x = arrays[key]
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise DataFileError(
            f"{path}: array {key!r} must be numeric [N, F], got {x.dtype} {x.shape}"
        )
    x = x.astype(np.float64)
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        raise DataFileError(
            f"{path}: array {key!r} has NaN or Inf at row {bad[0][0]} col {bad[0][1]}"
        )
    names = (
        [str(n) for n in arrays["feature_names"]]
        if "feature_names" in arrays
        else [f"f{i}" for i in range(x.shape[1])]
    )
    if len(names) != x.shape[1]:
        raise DataFileError(f"{path}: {len(names)} feature_names for {x.shape[1]} features")
    if label_column and label_column not in arrays:
        raise DataFileError(
            f"{path}: label array {label_column!r} missing; arrays: {sorted(arrays)}"
        )
    label_keys = (label_column,) if label_column else NPZ_LABEL_KEYS
    lkey = next((k for k in label_keys if k in arrays), None)
    if lkey is None:
        return NpzTable(x, names, None, None)
    y = arrays[lkey]
    if y.shape != (len(x),):
        raise DataFileError(f"{path}: labels {lkey!r} have shape {y.shape}, expected ({len(x)},)")
    labels, classes = parse_labels([str(v) for v in y.tolist()], f"{path}: array {lkey!r}")
    return NpzTable(x, names, labels, classes)
