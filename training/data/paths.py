"""Where dataset files are looked for and where decoded copies are cached."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from training.data.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_root() -> Path:
    """`$GANSENTRY_DATA`, else the shared datasets beside the repository, else a user cache.
    Shared data first so a fresh clone on the project machine finds the real files."""
    env = os.environ.get("GANSENTRY_DATA")
    if env:
        return Path(env).expanduser()
    shared = REPO_ROOT.parent / "shared" / "datasets"
    if shared.is_dir():
        return shared
    return Path("~/.cache/gansentry/datasets").expanduser()


def cache_dir() -> Path:
    """Decoded-dataset cache: `$GANSENTRY_CACHE`, else `~/.cache/gansentry`."""
    env = os.environ.get("GANSENTRY_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/gansentry").expanduser()


def find_file(dirs: Iterable[Path], names: Iterable[str]) -> Path | None:
    names = list(names)
    for d in dirs:
        for n in names:
            p = d / n
            if p.is_file():
                return p
    return None


def missing(what: str, dirs: Iterable[Path], names: Iterable[str]) -> DataError:
    looked = ", ".join(str(d) for d in dirs)
    return DataError(
        f"{what} not found: looked for {' or '.join(names)} in {looked}; "
        "download it (--download) or point GANSENTRY_DATA (or the data root option) at it"
    )
