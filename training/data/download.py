"""`--download`: fetch the public datasets from their canonical addresses, verify the
published checksums, and only then move them into place."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from training.data.errors import DataError

BASE_URL_ENV = "GANSENTRY_DOWNLOAD_BASE_URL"


@dataclass(frozen=True)
class Remote:
    name: str
    md5: str | None = None
    sha256: str | None = None


# Base addresses, tried in order. `GANSENTRY_DOWNLOAD_BASE_URL` (or `base_url=`) replaces
# them all with `{base}/{dataset}/{file}`, for mirrors and for tests on loopback.
BASE_URLS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "kddcup99": ["http://kdd.ics.uci.edu/databases/kddcup99/"],
}
# Published checksums (torchvision's for MNIST/Fashion-MNIST, the CIFAR page's md5).
FILES: dict[str, list[Remote]] = {
    "mnist": [
        Remote("train-images-idx3-ubyte.gz", md5="f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        Remote("train-labels-idx1-ubyte.gz", md5="d53e105ee54ea40749a09fcbcd1e9432"),
        Remote("t10k-images-idx3-ubyte.gz", md5="9fb629c4189551a2d022fa330f9573f3"),
        Remote("t10k-labels-idx1-ubyte.gz", md5="ec29112dd5afa0611ce80d1b7f02629c"),
    ],
    "fashion-mnist": [
        Remote("train-images-idx3-ubyte.gz", md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        Remote("train-labels-idx1-ubyte.gz", md5="25c81989df183df01b3e8a0aad5dffbe"),
        Remote("t10k-images-idx3-ubyte.gz", md5="bef4ecab320f06d8554ea6380940ec79"),
        Remote("t10k-labels-idx1-ubyte.gz", md5="bb300cfdad3c16e7a12a480ee83cd310"),
    ],
    "cifar10": [Remote("cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a")],
    "kddcup99": [
        Remote(
            "kddcup.data_10_percent.gz",
            sha256="8045aca0d84e70e622d1148d7df782496f6333bf6eb979a1b0837c42a9fd9561",
        )
    ],
}


def _digests(path: Path) -> tuple[str, str]:
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def verify(path: Path, remote: Remote) -> None:
    md5, sha = _digests(path)
    if remote.sha256 and sha != remote.sha256:
        raise DataError(f"{remote.name}: checksum mismatch: sha256 {sha}, expected {remote.sha256}")
    if remote.md5 and md5 != remote.md5:
        raise DataError(f"{remote.name}: checksum mismatch: md5 {md5}, expected {remote.md5}")


def _fetch(url: str, dest: Path, remote: Remote, timeout: float) -> None:
    """Stream to a temp file beside `dest`, verify, then rename: `dest` is either the whole
    verified file or absent."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=timeout) as resp,  # noqa: S310
        ):
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                for chunk in iter(lambda: resp.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        verify(Path(tmp), remote)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download(
    dataset: str, root: Path, *, base_url: str | None = None, timeout: float = 60.0
) -> Path:
    """Fetch any missing files of `dataset` into `root/dataset/`; returns that folder."""
    if dataset not in FILES:
        raise DataError(f"no download for {dataset!r}; downloadable: {', '.join(FILES)}")
    folder = root / dataset
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{folder}: cannot create the download folder ({e})") from e
    base = base_url or os.environ.get(BASE_URL_ENV)
    bases = [f"{base.rstrip('/')}/{dataset}/"] if base else BASE_URLS[dataset]
    for remote in FILES[dataset]:
        dest = folder / remote.name
        if dest.is_file():
            continue
        errors = []
        for b in bases:
            try:
                _fetch(b + remote.name, dest, remote, timeout)
                break
            except (urllib.error.URLError, OSError) as e:
                errors.append(f"{b + remote.name}: {e}")
        else:
            raise DataError(f"cannot download {remote.name}: {'; '.join(errors)}")
    return folder
