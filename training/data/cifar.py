"""CIFAR-10 as the official python pickle batches (extracted or in the .tar.gz) or as image
folders `train|test/<class>/*.png|jpg` (extracted or read straight from a .tar.gz)."""

from __future__ import annotations

import io
import pickle
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gansentry.datafiles import IMAGE_EXTS
from training.data.cache import cached_arrays
from training.data.errors import DataError
from training.data.images import LabelledImages
from training.data.paths import missing

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
FOLDER_MEMBER = re.compile(r"(?:^|/)(train|test)/([^/]+)/([^/]+)$")
SUBDIRS = ["cifar10", "cifar-10", "CIFAR10", "."]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The batches are pickles; refuse anything but plain containers and numpy arrays so a
    hostile file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # pickle raises many types on corrupt input
        raise DataError(f"{where}: not a CIFAR python batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        raise DataError(f"{where}: not a CIFAR python batch (no data/labels)")
    return obj


def _batch_arrays(batch: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"{where}: expected [N, 3072] pixels and N labels, got {data.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{where}: label outside 0-9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _read_batches(get: dict[str, bytes], source: Path) -> dict[str, np.ndarray]:
    parts = {}
    for name in [*TRAIN_BATCHES, TEST_BATCH]:
        if name not in get:
            raise DataError(f"{source}: CIFAR batch {name} is missing")
        parts[name] = _batch_arrays(_unpickle(get[name], f"{source}:{name}"), f"{source}:{name}")
    return {
        "train_x": np.concatenate([parts[n][0] for n in TRAIN_BATCHES]),
        "train_y": np.concatenate([parts[n][1] for n in TRAIN_BATCHES]),
        "test_x": parts[TEST_BATCH][0],
        "test_y": parts[TEST_BATCH][1],
        "classes": np.array(CIFAR10_CLASSES),
    }


def _batches_from_dir(folder: Path) -> dict[str, np.ndarray]:
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    return _read_batches(files, folder)


def _tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) for every regular file in a tar archive, streaming."""
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if m.isfile():
                    f = tar.extractfile(m)
                    if f is not None:
                        yield m.name, f.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read archive ({type(e).__name__}: {e})") from e


def _tar_kind(path: Path) -> str:
    """'batches' or 'folders', from the archive's first few names."""
    try:
        with tarfile.open(path, "r:*") as tar:
            for _, m in zip(range(200), tar, strict=False):
                if Path(m.name).name in TRAIN_BATCHES or BATCHES_DIR in m.name:
                    return "batches"
                if m.isfile() and FOLDER_MEMBER.search(m.name):
                    return "folders"
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read archive ({type(e).__name__}: {e})") from e
    raise DataError(f"{path}: neither CIFAR python batches nor train|test/<class>/ image folders")


def decode_pixels(data: bytes, where: str, mode: str | None = None) -> np.ndarray:
    """Encoded image -> uint8 [H, W] (grey) or [H, W, 3]; `mode` forces "L" or "RGB"."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            target = mode or ("L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
            if img.mode != target:
                if img.mode in ("P", "PA", "LA", "RGBA") and target == "L":
                    img = img.convert("RGBA")
                img = img.convert(target)
            return np.asarray(img, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e


def _folder_arrays(
    members: Iterator[tuple[str, bytes]], source: Path, class_order: list[str] | None
) -> dict[str, np.ndarray]:
    """Images from `train|test/<class>/` paths, in a deterministic (split, class, file) order."""
    found: list[tuple[str, str, str, bytes]] = []
    for name, data in members:
        m = FOLDER_MEMBER.search(name.replace("\\", "/"))
        if m and Path(name).suffix.lower() in IMAGE_EXTS and not m.group(3).startswith("."):
            found.append((m.group(1), m.group(2), name, data))
    if not found:
        raise DataError(f"{source}: no images under train/<class>/ or test/<class>/")
    names = sorted({c for _, c, _, _ in found})
    if class_order and set(names) == set(class_order):
        names = list(class_order)
    splits = {s for s, _, _, _ in found}
    if splits != {"train", "test"}:
        raise DataError(f"{source}: needs both train/ and test/ image folders, found {splits}")
    found.sort(key=lambda t: (t[0], names.index(t[1]), t[2]))
    first = decode_pixels(found[0][3], f"{source}:{found[0][2]}")
    mode = "L" if first.ndim == 2 else "RGB"
    out: dict[str, list] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for split, cls, name, data in found:
        px = decode_pixels(data, f"{source}:{name}", mode)
        if px.shape != first.shape:
            raise DataError(
                f"{source}:{name}: image is {px.shape[1]}x{px.shape[0]}, the others are "
                f"{first.shape[1]}x{first.shape[0]}"
            )
        out[f"{split}_x"].append(px)
        out[f"{split}_y"].append(names.index(cls))
    return {
        "train_x": np.stack(out["train_x"]),
        "train_y": np.array(out["train_y"], dtype=np.int64),
        "test_x": np.stack(out["test_x"]),
        "test_y": np.array(out["test_y"], dtype=np.int64),
        "classes": np.array(names),
    }


def _dir_members(folder: Path) -> Iterator[tuple[str, bytes]]:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            yield p.relative_to(folder).as_posix(), p.read_bytes()


def is_class_folder(path: Path) -> bool:
    return path.is_dir() and (path / "train").is_dir() and (path / "test").is_dir()


def load_source(path: Path, class_order: list[str] | None = None) -> LabelledImages:
    """Any supported CIFAR-style source: batches dir, class folder, or a tar of either."""

    def build() -> dict[str, np.ndarray]:
        if path.is_dir():
            if (path / TEST_BATCH).is_file():
                return _batches_from_dir(path)
            return _folder_arrays(_dir_members(path), path, class_order)
        if _tar_kind(path) == "batches":
            wanted = {*TRAIN_BATCHES, TEST_BATCH}
            members = {Path(n).name: d for n, d in _tar_members(path) if Path(n).name in wanted}
            return _read_batches(members, path)
        return _folder_arrays(_tar_members(path), path, class_order)

    arrays = cached_arrays("images", path, build)
    return LabelledImages(
        train_x=arrays["train_x"],
        train_y=arrays["train_y"],
        test_x=arrays["test_x"],
        test_y=arrays["test_y"],
        classes=[str(c) for c in arrays["classes"]],
        source=str(path),
    )


def locate_cifar10(root: Path) -> Path:
    """The first CIFAR-10 source under the root, preferring the official pickle batches."""
    dirs = [(root / d).resolve() for d in SUBDIRS]
    for d in dirs:
        if (d / BATCHES_DIR / TEST_BATCH).is_file():
            return d / BATCHES_DIR
        if (d / TEST_BATCH).is_file():
            return d
    for d in dirs:
        for name in ("cifar-10-python.tar.gz", "cifar10-jpeg.tar.gz"):
            if (d / name).is_file():
                return d / name
    for d in dirs:
        for sub in (d, d / "cifar10-jpeg", d / "cifar10"):
            if is_class_folder(sub):
                return sub
    for d in dirs:
        if d.is_dir() and d != root.resolve():
            archives = sorted([*d.glob("*.tar.gz"), *d.glob("*.tgz"), *d.glob("*.tar")])
            if archives:
                return archives[0]
    raise missing(
        "CIFAR-10",
        dirs,
        ["cifar-10-batches-py/", "cifar-10-python.tar.gz", "cifar10-jpeg.tar.gz", "train/ test/"],
    )


def load_cifar10(root: Path) -> LabelledImages:
    data = load_source(locate_cifar10(root), CIFAR10_CLASSES)
    if data.classes != CIFAR10_CLASSES:
        raise DataError(f"{data.source}: classes {data.classes} are not CIFAR-10's ten classes")
    return data
