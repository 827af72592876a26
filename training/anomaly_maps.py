"""Anomaly maps at export time: append the `anomaly_map` output (gansentry/anomaly_map.py)
to an image model's graph and calibrate its heat-map colour scale on validation normals.

`gansentry export` does this for every image model. `gansentry add-anomaly-map` does it for
a model that was exported before maps existed, whose training run may be gone: it
publishes the same graph plus the map as the model's next version, with the same
threshold and metrics (the score nodes are untouched, so every score is the same) and a
provenance saying which version it was derived from."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from gansentry.anomaly_map import (
    SIGMA_PX,
    VMAX_QUANTILE,
    AnomalyMapError,
    add_to_graph,
    calibrate_vmax,
    standalone,
)
from gansentry.contract import (
    ANOMALY_MAP_NAME,
    DEFAULT_OUTPUTS,
    INPUT_NAME,
    MODEL_FILE,
    RECONSTRUCTION_NAME,
)
from gansentry.manifest import AnomalyMapInfo, ImageInput, Manifest

CALIBRATION_BATCH = 256


def write_graph_with_map(src: Path, dst: Path, sigma: float = SIGMA_PX) -> None:
    """`src`'s graph with the anomaly map appended, saved to `dst` (may be `src`)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    onnx.save(add_to_graph(model, sigma), str(dst))


def calibrate(onnx_path: Path, spec: ImageInput, val: np.ndarray) -> AnomalyMapInfo:
    """The manifest's `anomaly_map` settings: the colour scale from the maps that the graph
    at `onnx_path` computes for the validation normals `val`."""
    from service.providers import create_session
    from service.settings import Settings

    if not len(val):
        raise AnomalyMapError("no validation normals to calibrate the anomaly-map colour scale on")
    session, _ = create_session(onnx_path, Settings(providers="cpu"), tuple(spec.shape))
    maps = [
        session.run(
            [ANOMALY_MAP_NAME],
            {INPUT_NAME: np.ascontiguousarray(val[i : i + CALIBRATION_BATCH], np.float32)},
        )[0]
        for i in range(0, len(val), CALIBRATION_BATCH)
    ]
    vmax = calibrate_vmax(np.concatenate(maps), VMAX_QUANTILE)
    rule = (
        f"{VMAX_QUANTILE * 100:g}th percentile of the map pixels of {len(val):,} "
        "validation-normal inputs"
    )
    return AnomalyMapInfo(sigma_px=SIGMA_PX, vmax=vmax, vmax_rule=rule)


def report_maps(
    x: np.ndarray, recons: np.ndarray, labels: np.ndarray, vmax: float | None
) -> tuple[np.ndarray, float]:
    """The anomaly maps of report examples, from their inputs and reconstructions through
    the same map graph that exported models carry (a training run, or a model exported
    before maps, has no map output of its own), and the colour scale: the model's, or the
    99.9th percentile of the normal examples' map pixels when it has none."""
    import onnxruntime as ort

    _, channels, height, width = x.shape
    graph = standalone(channels, height, width)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {
        INPUT_NAME: np.ascontiguousarray(x, np.float32),
        RECONSTRUCTION_NAME: np.ascontiguousarray(recons, np.float32),
    }
    maps = session.run([ANOMALY_MAP_NAME], feed)[0]
    if vmax is None:
        normal = maps[np.asarray(labels) == 0]
        vmax = calibrate_vmax(normal if len(normal) else maps)
    return maps, vmax


def manifest_fields(info: AnomalyMapInfo) -> dict[str, object]:
    return {"outputs": [*DEFAULT_OUTPUTS, ANOMALY_MAP_NAME], "anomaly_map": info}


def add_anomaly_map(
    version_dir: Path,
    *,
    models_dir: Path | None = None,
    data_root: Path | None = None,
    dataset: str | None = None,
    download: bool = False,
) -> tuple[Manifest, Path]:
    """Publish `models/NAME/V` with an anomaly map as the next version of NAME (in
    `models_dir`, by default the repository `version_dir` is in). The colour scale is
    calibrated on the validation normals of the model's own split, rebuilt from its
    manifest (or of `dataset`'s, when given)."""
    from training.evaluate import check_compatible, open_model_dir

    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise AnomalyMapError(f"{version_dir}: no such model folder")
    target = open_model_dir(version_dir)  # verifies manifest, sha256 and the I/O contract
    old = Manifest.load(version_dir)
    where = f"{old.name}/{old.version}"
    if not isinstance(old.input, ImageInput):
        raise AnomalyMapError(
            f"{where} takes records or feature arrays; anomaly maps are for images"
        )
    if old.has_anomaly_map:
        raise AnomalyMapError(f"{where} already has anomaly maps")
    if not old.has_reconstruction:
        raise AnomalyMapError(
            f"{where} has no reconstruction output; an anomaly map is made from one"
        )
    request = target.data.override(root=data_root, dataset=dataset)
    splits = request.load(download=download)
    check_compatible(old.input, splits.input_spec, request.dataset)
    out_root = Path(models_dir) if models_dir is not None else version_dir.parent.parent
    return publish_with_map(version_dir, np.asarray(splits.val, dtype=np.float32), out_root)


def publish_with_map(
    version_dir: Path, val: np.ndarray, models_dir: Path, name: str | None = None
) -> tuple[Manifest, Path]:
    """Publish the verified model folder `version_dir` plus its anomaly map as the next
    version of `name` (default: its own name) in `models_dir`, the colour scale calibrated
    on the validation normals `val`."""
    from training.onnx_export import publish

    old = Manifest.load(version_dir)
    where = f"{old.name}/{old.version}"
    with tempfile.TemporaryDirectory(prefix="gansentry-maps-") as tmp:
        onnx_path = Path(tmp) / MODEL_FILE
        write_graph_with_map(version_dir / MODEL_FILE, onnx_path)
        assert isinstance(old.input, ImageInput)
        info = calibrate(onnx_path, old.input, val)
        fields = old.model_dump(exclude={"name", "version", "onnx", "created_at"})
        fields["provenance"]["derived_from"] = (
            f"{where}: the same graph with the {ANOMALY_MAP_NAME} output appended "
            "(gansentry add-anomaly-map); scores, threshold and metrics are that version's"
        )
        fields.update(manifest_fields(info))
        fields["onnx"] = {
            "opset": old.onnx.opset,
            "parity_max_rel_diff": old.onnx.parity_max_rel_diff,
        }
        manifest = publish(models_dir, name or old.name, onnx_path, fields)
    return manifest, Path(models_dir) / manifest.name / str(manifest.version)
