"""The offline half of gansentry: data, models, training, evaluation and ONNX export.
Modules here may import torch; the service never imports this package."""

import contextlib
import ctypes
import sys

_M_MMAP_THRESHOLD = -3


def _return_large_blocks_to_the_os() -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which large
    tensors come from heap arenas that are never given back. Scoring KDD's test split with
    EGBAD's nearest-code score (one [256, 33k] matrix per batch) grew a process to 23 GB and
    the OOM killer when another job shared the cores; a fixed 1 MiB threshold kept it under
    1 GB. A no-op where the C library has no mallopt."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)


_return_large_blocks_to_the_os()
