"""Decoded copies of slow-to-parse sources (60k CIFAR JPEGs, the KDD CSV) as .npz files,
keyed by the source's path, size and mtime, so a changed source is never served stale."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.data.paths import cache_dir

log = logging.getLogger(__name__)


def source_key(path: Path) -> str:
    """Identity of a file, or of a folder tree (file count, total size and newest mtime)."""
    path = path.resolve()
    if path.is_dir():
        count = size = newest = 0
        for dirpath, _, files in os.walk(path):
            for f in files:
                st = os.stat(os.path.join(dirpath, f))
                count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime_ns)
        ident = f"{path}|dir|{count}|{size}|{newest}"
    else:
        st = path.stat()
        ident = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def cached_arrays(
    kind: str, source: Path, build: Callable[[], dict[str, np.ndarray]], version: int = 1
) -> dict[str, np.ndarray]:
    """Return `build()`'s arrays, from the cache when the source is unchanged. A cache that
    cannot be written (read-only home) or read (truncated) only costs a rebuild."""
    path = cache_dir() / f"{kind}-v{version}-{source_key(source)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            log.warning("ignoring unreadable cache %s: %s", path, e)
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("could not write cache %s: %s", path, e)
    return arrays
