"""`gansentry export`: a training run -> `models/NAME/VERSION/{model.onnx,manifest.json}`.

The manifest's metrics are measured on the test split with the exported ONNX graph on
ONNX Runtime (the service's own session factory), not with PyTorch, so the numbers in the
model repository describe exactly the graph that is served."""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gansentry.manifest import Manifest, Provenance
from training.evaluate import (
    check_compatible,
    config_value,
    cpu_session,
    data_options,
    run_request,
    score_batches,
)
from training.metrics import evaluate_scores, manifest_metrics

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
    run_dir: Path, models_dir: Path, name: str, *, data_root: Path | None = None
) -> tuple[Manifest, Path]:
    """Export the run's selected checkpoint as the next version of `name`."""
    check_name(name)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run folder")

    import torch

    from training.onnx_export import export_onnx, publish

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
    with tempfile.TemporaryDirectory(prefix="gansentry-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        rel = export_onnx(model.scorer(), torch.from_numpy(parity_batch(val, test)), onnx_path)
        scores, _ = score_batches(cpu_session(onnx_path, tuple(spec.shape)), test)
        metrics = evaluate_scores(scores, labels, info.threshold.value, splits.protocol)
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
            "threshold": info.threshold,
            "provenance": provenance,
            **manifest_metrics(metrics),
            "onnx": {"opset": _opset(onnx_path), "parity_max_rel_diff": rel},
        }
        manifest = publish(Path(models_dir), name, onnx_path, fields)
    return manifest, Path(models_dir) / name / str(manifest.version)
