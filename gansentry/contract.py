"""The ONNX I/O contract between `gansentry export` and the service.

One graph per model: input `x` (float32, `[N, C, H, W]` images in [0, 1] or `[N, F]`
preprocessed tabular features, dynamic `N`) -> `score` (float32 `[N]`, higher = more
anomalous). Optional outputs, each declared in the manifest's `outputs`:
`reconstruction` (float32, the input's shape and value range; every reconstructing model
has it, and manifests without `outputs` mean score and reconstruction) and, for image
models, `anomaly_map` (float32 `[N, H, W]`, see gansentry/anomaly_map.py). A model that
does not reconstruct its input is served with scores only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
INPUT_NAME = "x"
SCORE_NAME = "score"
RECONSTRUCTION_NAME = "reconstruction"
ANOMALY_MAP_NAME = "anomaly_map"
REQUIRED_OUTPUTS = (SCORE_NAME,)
OPTIONAL_OUTPUTS = (RECONSTRUCTION_NAME, ANOMALY_MAP_NAME)
# What a manifest without `outputs` (written before outputs were declared) means.
DEFAULT_OUTPUTS = (SCORE_NAME, RECONSTRUCTION_NAME)
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
    for needed in REQUIRED_OUTPUTS:
        if needed not in names:
            raise ContractError(f"missing output {needed!r}; outputs are {sorted(names)}")
    x, score, recon = inputs[0], names[SCORE_NAME], names.get(RECONSTRUCTION_NAME)
    like_x = [x] if recon is None else [x, recon]
    for arg in (*like_x, score):
        if arg.type != FLOAT_TYPE:
            raise ContractError(f"{arg.name!r} must be float32, got {arg.type}")
    expected = list(sample_shape)
    for arg, rank in (*((a, 1 + len(expected)) for a in like_x), (score, 1)):
        shape = list(arg.shape)
        if len(shape) != rank:
            raise ContractError(f"{arg.name!r} must have rank {rank}, got shape {shape}")
        if isinstance(shape[0], int):
            raise ContractError(f"{arg.name!r} must have a dynamic batch axis, got shape {shape}")
    for arg in like_x:
        fixed = list(arg.shape)[1:]
        if any(isinstance(d, int) and d != e for d, e in zip(fixed, expected, strict=True)):
            raise ContractError(
                f"{arg.name!r} has shape {list(arg.shape)}, expected {['N', *expected]}"
            )
    amap = names.get(ANOMALY_MAP_NAME)
    if amap is not None:
        _check_anomaly_map(amap, expected)


def _check_anomaly_map(amap: _NodeArg, sample_shape: list[int]) -> None:
    if len(sample_shape) != 3:
        raise ContractError(f"{ANOMALY_MAP_NAME!r} is for image models ([N, C, H, W] inputs)")
    if amap.type != FLOAT_TYPE:
        raise ContractError(f"{ANOMALY_MAP_NAME!r} must be float32, got {amap.type}")
    shape = list(amap.shape)
    expected = ["N", *sample_shape[1:]]
    if len(shape) != 3:
        raise ContractError(f"{ANOMALY_MAP_NAME!r} must have rank 3 {expected}, got {shape}")
    if isinstance(shape[0], int):
        raise ContractError(f"{ANOMALY_MAP_NAME!r} must have a dynamic batch axis, got {shape}")
    if any(isinstance(d, int) and d != e for d, e in zip(shape[1:], sample_shape[1:], strict=True)):
        raise ContractError(f"{ANOMALY_MAP_NAME!r} has shape {shape}, expected {expected}")
