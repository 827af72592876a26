"""Write a scorer as one ONNX graph that honours `gansentry.contract`, check ONNX
Runtime against PyTorch on a real batch, and publish it as the next version in the
model repository."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from gansentry.contract import (
    EXPORT_OPSET,
    INPUT_NAME,
    MODEL_FILE,
    RECONSTRUCTION_NAME,
    SCORE_NAME,
    check_io,
)
from gansentry.manifest import Manifest, OnnxInfo, sha256_file

PARITY_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree on a real batch beyond the tolerance."""


def export_onnx(scorer: torch.nn.Module, batch: torch.Tensor, path: Path) -> float:
    """Export `scorer` (x -> (score [N], reconstruction)) in eval mode with a dynamic batch
    axis; return the max relative score difference between ORT and PyTorch on `batch`."""
    scorer = scorer.eval().cpu()
    batch = batch.detach().float().cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            scorer,
            (batch,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[SCORE_NAME, RECONSTRUCTION_NAME],
            dynamic_shapes={"x": {0: torch.export.Dim("N", min=1, max=65536)}},
            opset_version=EXPORT_OPSET,
            verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check_io(session.get_inputs(), session.get_outputs(), tuple(batch.shape[1:]))
    ort_score, ort_recon = session.run(
        [SCORE_NAME, RECONSTRUCTION_NAME], {INPUT_NAME: batch.numpy()}
    )
    with torch.no_grad():
        pt_score, pt_recon = (t.numpy() for t in scorer(batch))
    rel = float(np.max(np.abs(ort_score - pt_score)) / max(float(np.max(np.abs(pt_score))), 1e-12))
    recon_diff = float(np.max(np.abs(ort_recon - pt_recon)))
    if rel > PARITY_TOLERANCE or recon_diff > 1e-3:
        raise ParityError(
            f"ONNX Runtime differs from PyTorch: score {rel:.2e} relative "
            f"(limit {PARITY_TOLERANCE:g}), reconstruction {recon_diff:.2e} absolute"
        )
    return rel


def next_version(models_dir: Path, name: str) -> int:
    root = Path(models_dir) / name
    versions = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
    return max(versions, default=0) + 1


def publish(models_dir: Path, name: str, onnx_path: Path, fields: dict[str, Any]) -> Manifest:
    """Copy `onnx_path` to `models_dir/name/VERSION/` with its manifest. The folder is
    built under a temporary name and renamed into place, so the service's reload never
    sees a half-written version and two concurrent exports get different versions."""
    root = Path(models_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        shutil.copyfile(onnx_path, staging / MODEL_FILE)
        onnx = OnnxInfo(sha256=sha256_file(staging / MODEL_FILE), **fields.pop("onnx", {}))
        while True:
            version = next_version(models_dir, name)
            manifest = Manifest(name=name, version=version, onnx=onnx, **fields)
            manifest.save(staging)
            try:
                os.rename(staging, root / str(version))
                return manifest
            except OSError:
                if not (root / str(version)).exists():
                    raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
