"""`gansentry export`: a training run -> `models/NAME/VERSION/{model.onnx,manifest.json}`.

The manifest's metrics are measured on the test split with the exported ONNX graph on
ONNX Runtime (the service's own session factory), not with PyTorch, so the numbers in the
model repository describe exactly the graph that is served. Image models that reconstruct
their input get the `anomaly_map` output (training/anomaly_maps.py) after the parity
check, which compares the score and reconstruction that PyTorch also computes."""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gansentry.contract import REQUIRED_OUTPUTS
from gansentry.manifest import ImageInput, Manifest, Provenance, Threshold
from gansentry.preprocessing import UNKNOWN_POLICIES
from training.evaluate import (
    check_compatible,
    config_value,
    cpu_session,
    data_options,
    run_request,
    score_batches,
)
from training.metrics import evaluate_scores, manifest_metrics
from training.thresholds import ThresholdError, calibrate, summarise

PARITY_BATCH = 64
_NAME_PATTERN = next(
    m.pattern for m in Manifest.model_fields["name"].metadata if getattr(m, "pattern", None)
)


class ExportError(ValueError):
    """The run cannot be exported; the message names the problem."""


def check_name(name: str) -> None:
    if not re.fullmatch(_NAME_PATTERN, name):
        raise ExportError(
            f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _scalar(v: Any) -> float | int | str | bool | None:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple | dict):
        return json.dumps(v)
    return str(v)


def hyperparameters(cfg: Any, hparams: dict[str, Any], split_seed: int | None) -> dict:
    """Model hyper-parameters, the optimiser settings and the data options needed to
    rebuild the run's split (see `training.evaluate.data_options`)."""
    out: dict[str, Any] = {k: _scalar(v) for k, v in (hparams or {}).items()}
    for key in ("batch_size", "lr", "image_size", "threshold_quantile"):
        if config_value(cfg, key) is not None:
            out.setdefault(key, _scalar(config_value(cfg, key)))
    out.update(data_options(cfg, split_seed))
    return out


def parity_batch(val: np.ndarray, test: np.ndarray, size: int = PARITY_BATCH) -> np.ndarray:
    """Real inputs for the ORT-vs-PyTorch check: half held-out normals, half test samples
    (which include anomalies), so the check covers both ends of the score range."""
    half = size // 2
    rng = np.random.default_rng(0)
    v = val[rng.choice(len(val), size=min(half, len(val)), replace=False)]
    t = test[rng.choice(len(test), size=min(size - len(v), len(test)), replace=False)]
    return np.ascontiguousarray(np.concatenate([v, t]), dtype=np.float32)


def _opset(onnx_path: Path) -> int:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_run(
    run_dir: Path,
    models_dir: Path,
    name: str,
    *,
    data_root: Path | None = None,
    threshold_quantile: float | None = None,
    target_fpr: float | None = None,
    unknown_policy: str | None = None,
    parity_tolerance: float | None = None,
) -> tuple[Manifest, Path]:
    """Export the run's selected checkpoint as the next version of `name`.

    The threshold is the run's, unless `threshold_quantile` or `target_fpr` asks for
    another rule: then it is recalibrated on the exported graph's own scores of the run's
    validation normals (`training.thresholds.calibrate`, which refuses a rule that ties
    make impossible). Either way the manifest records that score distribution.
    `unknown_policy` (reject or anomaly) sets what the service does with record values
    the model does not know; `parity_tolerance` overrides the ORT-vs-PyTorch check's."""
    check_name(name)
    if threshold_quantile is not None and target_fpr is not None:
        raise ExportError("give --threshold-quantile or --target-fpr, not both")
    if unknown_policy is not None and unknown_policy not in UNKNOWN_POLICIES:
        raise ExportError(
            f"unknown policy {unknown_policy!r}; choose {' or '.join(UNKNOWN_POLICIES)}"
        )
    if parity_tolerance is not None and not parity_tolerance >= 0:
        raise ExportError(f"--parity-tolerance must be >= 0, got {parity_tolerance}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run folder")

    import torch

    from training.onnx_export import PARITY_TOLERANCE, ParityError, export_onnx, publish

    # The exporter logs every optimisation pass, and a warning per missing torchvision op.
    for noisy in ("onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    from training.runs import load_run

    model, info = load_run(run_dir, device="cpu")
    cfg = info.config
    spec = info.input_spec
    request = run_request(info).override(root=data_root)
    splits = request.load()
    val = np.asarray(splits.val, dtype=np.float32)
    test = np.asarray(splits.test, dtype=np.float32)
    labels = np.asarray(splits.test_labels).astype(np.int64).reshape(-1)
    check_compatible(spec, splits.input_spec, request.dataset)
    spec = _with_policy(spec, unknown_policy)
    tolerance = PARITY_TOLERANCE if parity_tolerance is None else parity_tolerance
    with tempfile.TemporaryDirectory(prefix="gansentry-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        try:
            rel = export_onnx(
                model.scorer(),
                torch.from_numpy(parity_batch(val, test)),
                onnx_path,
                threshold=info.threshold.value,
                tolerance=tolerance,
            )
        except ParityError as e:
            raise ExportError(
                f"{name}: {e}. If the scores are right for your use, export with a larger "
                "--parity-tolerance (a fraction of the spread of the scores)"
            ) from None
        # The graph's outputs: score, plus reconstruction and (images) anomaly maps if the
        # model reconstructs its input; the map is built from the reconstruction.
        maps: dict[str, Any] = {} if model.reconstructs else {"outputs": list(REQUIRED_OUTPUTS)}
        if isinstance(spec, ImageInput) and model.reconstructs:
            from training.anomaly_maps import calibrate, manifest_fields, write_graph_with_map

            write_graph_with_map(onnx_path, onnx_path)
            maps = manifest_fields(calibrate(onnx_path, spec, val))
        session = cpu_session(onnx_path, tuple(spec.shape))
        val_scores, _ = score_batches(session, val)
        threshold = _threshold(info.threshold, val_scores, threshold_quantile, target_fpr)
        scores, _ = score_batches(session, test)
        metrics = evaluate_scores(scores, labels, threshold.value, splits.protocol)
        provenance = Provenance(
            dataset=str(info.dataset),
            protocol=str(info.protocol),
            normal_classes=[str(c) for c in info.normal_classes],
            anomalous_classes=[str(c) for c in info.anomalous_classes],
            epochs=int(info.epochs_done),
            seed=int(info.seed),
            git_commit=info.git_commit,
            training_seconds=info.training_seconds,
            selected_epoch=info.selected_epoch,
            hyperparameters=hyperparameters(cfg, info.hparams, info.split_seed),
        )
        fields = {
            "architecture": info.arch or str(config_value(cfg, "model")),
            "input": spec,
            "threshold": threshold,
            "provenance": provenance,
            **manifest_metrics(metrics),
            "onnx": {"opset": _opset(onnx_path), "parity_max_rel_diff": rel},
            **maps,
        }
        manifest = publish(Path(models_dir), name, onnx_path, fields)
    return manifest, Path(models_dir) / name / str(manifest.version)


def _with_policy(spec: Any, policy: str | None) -> Any:
    if policy is None:
        return spec
    prep = getattr(spec, "preprocessing", None)
    if prep is None:
        raise ExportError(
            "--unknown-policy applies to models that take raw records; this one takes "
            + ("images" if isinstance(spec, ImageInput) else "feature arrays only")
        )
    return spec.model_copy(
        update={"preprocessing": prep.model_copy(update={"unknown_policy": policy})}
    )


def _threshold(
    trained: Threshold,
    val_scores: np.ndarray,
    quantile: float | None,
    target_fpr: float | None,
) -> Threshold:
    """The run's threshold (with the distribution it sits in, measured on the exported
    graph), or a new one by the asked rule, calibrated on the exported graph's scores."""
    source = "validation-normal scores of the exported graph"
    if quantile is None and target_fpr is None:
        # Training keeps a threshold that ties made useless (so no run is lost) and warns;
        # publishing it is refused here, where --target-fpr can choose a rate that works.
        if trained.quantile is not None:
            try:
                calibrate(val_scores, quantile=trained.quantile, source=source)
            except ThresholdError as e:
                raise ExportError(f"the run's threshold cannot be served: {e}") from None
        if trained.validation is not None:
            return trained
        return trained.model_copy(update={"validation": summarise(val_scores, trained.value)})
    try:
        return calibrate(val_scores, quantile=quantile, target_fpr=target_fpr, source=source)
    except ThresholdError as e:
        raise ExportError(str(e)) from None
