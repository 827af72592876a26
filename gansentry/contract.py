"""The ONNX I/O contract between `gansentry export` and the service.

One graph per model: input `x` (float32, `[N, C, H, W]` images in [0, 1] or `[N, F]`
preprocessed tabular features, dynamic `N`) -> `score` (float32 `[N]`, higher = more
anomalous) and `reconstruction` (float32, the input's shape and value range)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
INPUT_NAME = "x"
SCORE_NAME = "score"
RECONSTRUCTION_NAME = "reconstruction"
MIN_OPSET = 17
EXPORT_OPSET = 18
FLOAT_TYPE = "tensor(float)"


class ContractError(ValueError):
    """The graph does not honour the I/O contract; the message says which part."""


class _NodeArg(Protocol):
    name: str
    type: str
    shape: Sequence[int | str | None]


def check_io(
    inputs: Sequence[_NodeArg], outputs: Sequence[_NodeArg], sample_shape: Sequence[int]
) -> None:
    """Check an ONNX Runtime session's inputs/outputs (`get_inputs()`, `get_outputs()`)
    against the contract for a model whose single sample has `sample_shape`."""
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise ContractError(
            f"expected one input named {INPUT_NAME!r}, got {[i.name for i in inputs]}"
        )
    names = {o.name: o for o in outputs}
    for needed in (SCORE_NAME, RECONSTRUCTION_NAME):
        if needed not in names:
            raise ContractError(f"missing output {needed!r}; outputs are {sorted(names)}")
    x, score, recon = inputs[0], names[SCORE_NAME], names[RECONSTRUCTION_NAME]
    for arg in (x, score, recon):
        if arg.type != FLOAT_TYPE:
            raise ContractError(f"{arg.name!r} must be float32, got {arg.type}")
    expected = list(sample_shape)
    for arg, rank in ((x, 1 + len(expected)), (recon, 1 + len(expected)), (score, 1)):
        shape = list(arg.shape)
        if len(shape) != rank:
            raise ContractError(f"{arg.name!r} must have rank {rank}, got shape {shape}")
        if isinstance(shape[0], int):
            raise ContractError(f"{arg.name!r} must have a dynamic batch axis, got shape {shape}")
    for arg in (x, recon):
        fixed = list(arg.shape)[1:]
        if any(isinstance(d, int) and d != e for d, e in zip(fixed, expected, strict=True)):
            raise ContractError(
                f"{arg.name!r} has shape {list(arg.shape)}, expected {['N', *expected]}"
            )
