"""Tiny dataset files in every format gansentry reads, for tests and quick training runs.

Each `make_*` writes real files (the same bytes layout as the published datasets) and
returns the path to pass to `load_splits` (as `root=` for the named datasets, as `dataset`
for users' own data). Images get a class-specific pattern plus noise, so a model can
actually learn the classes apart and every sample is unique (useful for leakage checks).

    root = make_mnist(tmp_path)                        # root/mnist/*-ubyte.gz
    splits = load_splits("mnist", normal_class=3, root=root)
    kdd = make_kdd(tmp_path / "kddcup99" / "kddcup.data_10_percent.gz")
    splits = load_splits("kddcup99", root=tmp_path)
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.cifar import CIFAR10_CLASSES

KDD_PROTOCOLS = ["icmp", "tcp", "udp"]
# The 66 services and 11 flags of the real 10% file, so the one-hot width is the real 121.
KDD_SERVICES = [
    "IRC",
    "X11",
    "Z39_50",
    "auth",
    "bgp",
    "courier",
    "csnet_ns",
    "ctf",
    "daytime",
    "discard",
    "domain",
    "domain_u",
    "echo",
    "eco_i",
    "ecr_i",
    "efs",
    "exec",
    "finger",
    "ftp",
    "ftp_data",
    "gopher",
    "hostnames",
    "http",
    "http_443",
    "imap4",
    "iso_tsap",
    "klogin",
    "kshell",
    "ldap",
    "link",
    "login",
    "mtp",
    "name",
    "netbios_dgm",
    "netbios_ns",
    "netbios_ssn",
    "netstat",
    "nnsp",
    "nntp",
    "ntp_u",
    "other",
    "pm_dump",
    "pop_2",
    "pop_3",
    "printer",
    "private",
    "red_i",
    "remote_job",
    "rje",
    "shell",
    "smtp",
    "sql_net",
    "ssh",
    "sunrpc",
    "supdup",
    "systat",
    "telnet",
    "tftp_u",
    "tim_i",
    "time",
    "urh_i",
    "urp_i",
    "uucp",
    "uucp_path",
    "vmnet",
    "whois",
]
KDD_FLAGS = ["OTH", "REJ", "RSTO", "RSTOS0", "RSTR", "S0", "S1", "S2", "S3", "SF", "SH"]
KDD_ATTACKS = ["smurf.", "neptune.", "back.", "satan."]


def class_images(
    labels: np.ndarray, size: int = 28, channels: int = 1, seed: int = 0
) -> np.ndarray:
    """uint8 [N, size, size] (or [N, size, size, 3]): class k is a bright bar at row
    band k over low noise; colour images also tint by class."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    img = rng.integers(0, 40, size=(n, size, size), dtype=np.uint8)
    band = max(1, size // 10)
    for i, k in enumerate(labels):
        r = int(k) % 10 * band
        img[i, r : r + band, 2:-2] = 200 + rng.integers(0, 55)
    if channels == 1:
        return img
    labels = np.asarray(labels, dtype=np.int64)
    tint = np.stack([(labels * 25) % 256, (labels * 70) % 256, (labels * 130) % 256], axis=1)
    rgb = np.repeat(img[..., None], 3, axis=3).astype(np.int32)
    rgb = rgb // 2 + tint[:, None, None, :].astype(np.int32) // 2
    return rgb.clip(0, 255).astype(np.uint8)


def balanced_labels(n: int, classes: int = 10, seed: int = 0) -> np.ndarray:
    """n labels cycling over the classes, shuffled: every class present when n >= classes."""
    return np.random.default_rng(seed).permutation(np.arange(n) % classes).astype(np.uint8)


# ---------------------------------------------------------------- MNIST / Fashion-MNIST


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """An unsigned-byte IDX file (the MNIST format), gzip-compressed when `gz`."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_mnist(
    root: Path,
    subdir: str = "mnist",
    n_train: int = 200,
    n_test: int = 100,
    gz: bool = True,
    size: int = 28,
    seed: int = 0,
) -> Path:
    """The four MNIST IDX files under root/subdir (use subdir="fashion-mnist" for Fashion).
    Returns `root`."""
    folder = Path(root) / subdir
    suffix = ".gz" if gz else ""
    for split, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        y = balanced_labels(n, seed=s)
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", class_images(y, size, 1, s), gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", y, gz)
    return Path(root)


# ---------------------------------------------------------------- CIFAR-10


def _cifar_batch(n: int, seed: int) -> bytes:
    y = balanced_labels(n, seed=seed)
    x = class_images(y, 32, 3, seed).transpose(0, 3, 1, 2).reshape(n, -1)
    batch = {b"data": x, b"labels": [int(v) for v in y], b"batch_label": b"generated"}
    return pickle.dumps(batch, protocol=2)


def make_cifar_batches(
    root: Path, n_per_batch: int = 20, as_tar: bool = True, seed: int = 0
) -> Path:
    """The official python layout: root/cifar10/cifar-10-python.tar.gz (or the extracted
    root/cifar10/cifar-10-batches-py/) with data_batch_1..5 and test_batch. Returns root."""
    files = {f"data_batch_{i}": _cifar_batch(n_per_batch, seed + i) for i in range(1, 6)}
    files["test_batch"] = _cifar_batch(n_per_batch, seed + 10)
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    files["batches.meta"] = pickle.dumps(meta, protocol=2)
    folder = Path(root) / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    if as_tar:
        _write_tar(
            folder / "cifar-10-python.tar.gz",
            {f"cifar-10-batches-py/{k}": v for k, v in files.items()},
        )
    else:
        (folder / "cifar-10-batches-py").mkdir(exist_ok=True)
        for k, v in files.items():
            (folder / "cifar-10-batches-py" / k).write_bytes(v)
    return Path(root)


def _encode(pixels: np.ndarray, ext: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG" if ext in ("jpg", "jpeg") else "PNG")
    return buf.getvalue()


def _write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_class_folders(
    folder: Path,
    n_train: int = 3,
    n_test: int = 2,
    classes: list[str] = CIFAR10_CLASSES,
    ext: str = "png",
    as_tar: bool = False,
    size: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> Path:
    """`train|test/<class>/NNNN.<ext>` per class; with `as_tar` a `<folder>.tar.gz` holding
    `<folder name>/train/...` instead (as ../shared/datasets/cifar10 ships). Returns the
    folder or the archive."""
    folder = Path(folder)
    files: dict[str, bytes] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for k, cls in enumerate(classes):
            y = np.full(n, k)
            px = class_images(y, size, channels, seed + k + (100 if split == "test" else 0))
            for i in range(n):
                files[f"{split}/{cls}/{i:04d}.{ext}"] = _encode(px[i], ext)
    if as_tar:
        folder.parent.mkdir(parents=True, exist_ok=True)
        archive = folder.parent / f"{folder.name}.tar.gz"
        return _write_tar(archive, {f"{folder.name}/{k}": v for k, v in files.items()})
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


# ---------------------------------------------------------------- KDD Cup 99


def kdd_rows(n: int = 400, normal_fraction: float = 0.2, seed: int = 0) -> list[list[str]]:
    """KDD Cup 99 records (41 fields + label). "normal." rows (the DAGMM anomaly) have large
    byte counts and few connections; attack rows the opposite. The first rows cycle through
    every protocol, service, flag and binary value, so the full 121-feature vocabulary is
    present whenever n >= 66."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        normal = rng.random() < normal_fraction
        f = [0.0] * 41
        f[0] = float(rng.integers(0, 5))
        f[4] = float(rng.integers(200, 2000) if normal else rng.integers(0, 50))
        f[5] = float(rng.integers(500, 5000) if normal else 0)
        f[22] = float(rng.integers(1, 10) if normal else rng.integers(100, 511))
        f[23] = float(rng.integers(1, 10) if normal else rng.integers(100, 511))
        for j in (24, 25, 26, 27, 28, 29, 30, 33, 34, 35, 36, 37, 38, 39, 40):
            f[j] = round(float(rng.random()), 2)
        f[31], f[32] = float(rng.integers(0, 256)), float(rng.integers(0, 256))
        rec = [f"{v:g}" if j < 22 or j in (22, 23, 31, 32) else f"{v:.2f}" for j, v in enumerate(f)]
        rec[1] = KDD_PROTOCOLS[i % 3]
        rec[2] = KDD_SERVICES[i % len(KDD_SERVICES)]
        rec[3] = KDD_FLAGS[i % len(KDD_FLAGS)]
        rec[6] = str(i % 2)  # land
        rec[11] = str((i // 2) % 2)  # logged_in
        rec[20] = "0"  # is_host_login: one value in the 10% file
        rec[21] = str((i // 3) % 2)  # is_guest_login
        rec.append("normal." if normal else KDD_ATTACKS[i % len(KDD_ATTACKS)])
        rows.append(rec)
    return rows


def make_kdd(path: Path, n: int = 400, gz: bool = True, seed: int = 0) -> Path:
    """A KDD Cup 99 CSV (gzip when `gz`) at `path`; name it kddcup.data_10_percent[.gz]
    under root/kddcup99/ for `load_splits("kddcup99", root=root)`."""
    text = "".join(",".join(r) + "\n" for r in kdd_rows(n, seed=seed)).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


# ---------------------------------------------------------------- users' own data


def make_image_folder(
    folder: Path,
    n_normal: int = 20,
    n_anomalous: int = 6,
    sizes: tuple[tuple[int, int], ...] = ((28, 28), (28, 28), (40, 36)),
    modes: tuple[str, ...] = ("L", "L", "RGB"),
    seed: int = 0,
) -> Path:
    """folder/normal/*.png and folder/anomalous/*.png (skipped when n_anomalous=0), cycling
    through `sizes` (w, h) and `modes` so loaders see mixed sizes and grey/colour."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    for sub, n, k in (("normal", n_normal, 1), ("anomalous", n_anomalous, 7)):
        if n == 0:
            continue
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            base = class_images(np.array([k]), 64, 3, seed=int(rng.integers(1 << 30)))[0]
            img = Image.fromarray(base).resize((w, h)).convert(modes[i % len(modes)])
            img.save(folder / sub / f"{i:04d}.png")
    return folder


def tabular_rows(n_normal: int = 60, n_anomalous: int = 15, seed: int = 0) -> list[dict]:
    """Records with numeric a, b, symbolic colour and a 'normal'/'anomaly' label."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_normal + n_anomalous):
        anomalous = i >= n_normal
        rows.append(
            {
                "a": float(rng.normal(5 if anomalous else 0, 1)),
                "b": float(rng.uniform(10, 20) if anomalous else rng.uniform(0, 10)),
                "colour": ["red", "green", "blue"][i % 3] if not anomalous else "purple",
                "label": "anomaly" if anomalous else "normal",
            }
        )
    return rows


def make_csv(path: Path, n_normal: int = 60, n_anomalous: int = 15, seed: int = 0) -> Path:
    """A CSV with header a,b,colour,label (see `tabular_rows`)."""
    rows = tabular_rows(n_normal, n_anomalous, seed)
    lines = ["a,b,colour,label"] + [f"{r['a']},{r['b']},{r['colour']},{r['label']}" for r in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def make_npz(
    path: Path, n_normal: int = 60, n_anomalous: int = 15, features: int = 5, seed: int = 0
) -> Path:
    """An NPZ with `x` float [N, features], `y` 0/1 and `feature_names`."""
    rng = np.random.default_rng(seed)
    x = np.concatenate(
        [rng.normal(0, 1, (n_normal, features)), rng.normal(4, 1, (n_anomalous, features))]
    )
    y = np.concatenate([np.zeros(n_normal, np.int64), np.ones(n_anomalous, np.int64)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y, feature_names=np.array([f"sensor_{i}" for i in range(features)]))
    return path
