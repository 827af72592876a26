"""MNIST and Fashion-MNIST in the IDX format (gzip or raw), as published."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from training.data.errors import DataError
from training.data.images import LabelledImages
from training.data.paths import find_file, missing

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# Folder names users and torchvision put these files in, relative to the data root.
SUBDIRS = {
    "mnist": ["mnist", "MNIST/raw", "MNIST", "."],
    "fashion-mnist": ["fashion-mnist", "FashionMNIST/raw", "fashion_mnist", "fashion", "."],
}


def read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    return data


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array. Checks magic, dimensions and length so a truncated or
    mislabelled file fails here rather than as a garbled training set."""
    data = read_bytes(path)
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise DataError(
            f"{path}: not an IDX file of unsigned bytes with {ndim} dimension(s) "
            f"(magic {data[:4].hex() or 'missing'}, expected 0000080{ndim})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(
            f"{path}: wrong size: header says {'x'.join(map(str, dims))} = {expected} bytes, "
            f"file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def locate(name: str, root: Path) -> dict[str, Path]:
    dirs = [(root / d).resolve() for d in SUBDIRS[name]]
    found: dict[str, Path] = {}
    for key, base in IDX_FILES.items():
        names = [base + ".gz", base, base.replace("-idx", ".idx")]
        path = find_file(dirs, names)
        if path is None:
            raise missing(f"{name} file {base}.gz", dirs, names)
        found[key] = path
    return found


def load_idx_dataset(name: str, root: Path) -> LabelledImages:
    files = locate(name, root)
    arrays = {k: read_idx(p, 3 if k.endswith("_x") else 1) for k, p in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if len(x) != len(y):
            raise DataError(
                f"{files[f'{split}_y']}: {len(y)} labels for {len(x)} images "
                f"in {files[f'{split}_x']}"
            )
        if len(y) and y.max() > 9:
            raise DataError(f"{files[f'{split}_y']}: label {int(y.max())} outside 0-9")
    return LabelledImages(
        train_x=arrays["train_x"],
        train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"],
        test_y=arrays["test_y"].astype(np.int64),
        classes=MNIST_CLASSES if name == "mnist" else FASHION_CLASSES,
        source=str(files["train_x"].parent),
    )
