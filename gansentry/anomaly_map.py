"""Anomaly maps for image models: where in the picture the model could not reproduce the
input. Written once and used by every path:

- `add_to_graph` appends the map to an exported graph as the optional output
  `anomaly_map` (float32 `[N, H, W]`): |x - reconstruction|, averaged over channels, then
  smoothed with a fixed Gaussian (`SIGMA_PX`, reflect padding, one Conv). The exporter
  calls it for every image model and `gansentry add-anomaly-map` for a model exported
  before maps existed, so the API, the v2 protocol and the Redis worker all get the map
  from ONNX Runtime, computed by the same graph that computes the score, and never from
  code of their own.
- `calibrate_vmax` picks the heat-map colour scale from validation normals, and
  `heatmap_png` renders a map with a fixed colour map (numpy only, no plotting library on
  the serving path).

Smoothing, because a raw pixel residual is dominated by one-pixel edge misalignments of
an otherwise good reconstruction; a couple of pixels of blur leaves the regions where the
reconstruction is really wrong. Only the graph building needs the `onnx` package, and it
is imported there, so the service does not depend on it."""

from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from gansentry.contract import ANOMALY_MAP_NAME, EXPORT_OPSET, INPUT_NAME, RECONSTRUCTION_NAME

if TYPE_CHECKING:
    import onnx

SIGMA_PX = 2.0  # about the width of a pen stroke in a 32x32 digit
TRUNCATE = 3.0  # kernel radius in sigmas: the weights past it sum to < 0.3%
VMAX_QUANTILE = 0.999
_PREFIX = "anomaly_map/"

# The "inferno" colour map at five stops (black, purple, red, orange, pale yellow),
# interpolated linearly into a 256-entry table: dark is normal, bright is anomalous, and
# it reads in grey-scale print too.
_STOPS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)
LUT = (
    np.stack(
        [
            np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_STOPS)), _STOPS[:, c])
            for c in (0, 1, 2)
        ],
        axis=1,
    )
    .round()
    .astype(np.uint8)
)


class AnomalyMapError(ValueError):
    """The graph cannot be given an anomaly map; the message says why."""


def radius(sigma: float = SIGMA_PX) -> int:
    return max(1, math.ceil(TRUNCATE * sigma))


def gaussian_kernel(sigma: float = SIGMA_PX) -> np.ndarray:
    """The normalised 2-D Gaussian, float32 `[2r + 1, 2r + 1]`."""
    r = radius(sigma)
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(t**2) / (2 * sigma**2))
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def add_to_graph(model: onnx.ModelProto, sigma: float = SIGMA_PX) -> onnx.ModelProto:
    """A copy of `model` (input `x` `[N, C, H, W]`, output `reconstruction` of the same
    shape) with the output `anomaly_map` `[N, H, W]` appended. The existing nodes and
    outputs are untouched, so the scores of the new graph are those of the old one."""
    import onnx

    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    if ANOMALY_MAP_NAME in outputs:
        raise AnomalyMapError(f"the graph already has an {ANOMALY_MAP_NAME!r} output")
    if INPUT_NAME not in inputs or RECONSTRUCTION_NAME not in outputs:
        raise AnomalyMapError(
            f"the graph needs an input {INPUT_NAME!r} and an output {RECONSTRUCTION_NAME!r}"
        )
    dims = inputs[INPUT_NAME].type.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[1:]):
        raise AnomalyMapError(
            f"anomaly maps are for image models, whose input {INPUT_NAME!r} is [N, C, H, W] "
            "with fixed C, H and W"
        )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    height, width = int(dims[2].dim_value), int(dims[3].dim_value)
    _append(out.graph, dims[0].dim_param or "N", height, width, sigma, opset)
    onnx.checker.check_model(out)
    return out


def standalone(
    channels: int, height: int, width: int, sigma: float = SIGMA_PX, opset: int = EXPORT_OPSET
) -> onnx.ModelProto:
    """The same map as a graph of its own, inputs `x` and `reconstruction`: for pictures of
    a model whose graph has no map (a training run, an old export), computed identically."""
    import onnx
    from onnx import TensorProto, helper

    shape = ["N", channels, height, width]
    graph = helper.make_graph(
        [],
        "anomaly_map",
        [
            helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape),
            helper.make_tensor_value_info(RECONSTRUCTION_NAME, TensorProto.FLOAT, shape),
        ],
        [],
    )
    _append(graph, "N", height, width, sigma, opset)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _append(
    graph: onnx.GraphProto, batch: str, height: int, width: int, sigma: float, opset: int
) -> None:
    """The map's nodes, reading `x` and `reconstruction` in `graph`, writing `anomaly_map`,
    in the graph's own opset (ReduceMean takes its axes as an input from opset 18, as an
    attribute before; the contract allows 17)."""
    from onnx import TensorProto, helper, numpy_helper

    r = radius(sigma)
    if r >= min(height, width):
        raise AnomalyMapError(
            f"a {height}x{width} image is too small for a smoothing radius of {r} pixels"
        )

    def name(s: str) -> str:
        return _PREFIX + s

    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], np.int64), name("channel_axis")),
            numpy_helper.from_array(np.array([0, 0, r, r, 0, 0, r, r], np.int64), name("pads")),
            numpy_helper.from_array(gaussian_kernel(sigma)[None, None], name("kernel")),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Sub", [INPUT_NAME, RECONSTRUCTION_NAME], [name("diff")]),
            helper.make_node("Abs", [name("diff")], [name("residual")]),
            helper.make_node(
                "ReduceMean", [name("residual"), name("channel_axis")], [name("grey")], keepdims=1
            )
            if opset >= 18
            else helper.make_node(
                "ReduceMean", [name("residual")], [name("grey")], axes=[1], keepdims=1
            ),
            helper.make_node("Pad", [name("grey"), name("pads")], [name("padded")], mode="reflect"),
            helper.make_node("Conv", [name("padded"), name("kernel")], [name("smooth")]),
            helper.make_node("Squeeze", [name("smooth"), name("channel_axis")], [ANOMALY_MAP_NAME]),
        ]
    )
    graph.output.append(
        helper.make_tensor_value_info(ANOMALY_MAP_NAME, TensorProto.FLOAT, [batch, height, width])
    )


def calibrate_vmax(maps: np.ndarray, quantile: float = VMAX_QUANTILE) -> float:
    """The colour scale's top: the `quantile` of validation-normal map pixels, so a normal
    input stays dark and the bright end means "more wrong than almost any normal pixel"."""
    values = np.asarray(maps, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if not values.size:
        raise AnomalyMapError("no finite anomaly-map values to calibrate the colour scale on")
    vmax = float(np.quantile(values, quantile))
    return vmax if vmax > 0 else float(values.max()) or 1.0


def heatmap(amap: np.ndarray, vmax: float) -> np.ndarray:
    """One map `[H, W]` -> RGB uint8 `[H, W, 3]`, 0..vmax over the colour map (clipped)."""
    scaled = np.clip(np.asarray(amap, dtype=np.float32) / np.float32(vmax), 0.0, 1.0)
    return LUT[np.rint(scaled * 255).astype(np.uint8)]


def heatmap_png(amap: np.ndarray, vmax: float) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(heatmap(amap, vmax)).save(buf, format="PNG")
    return buf.getvalue()


def heatmap_base64_png(amap: np.ndarray, vmax: float) -> str:
    """The form `/score` answers with, as it answers reconstructions."""
    return base64.b64encode(heatmap_png(amap, vmax)).decode("ascii")
