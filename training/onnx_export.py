"""Write a scorer as one ONNX graph that honours `gansentry.contract`, check ONNX
Runtime against PyTorch on a real batch, and publish it as the next version in the
model repository."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
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

# ONNX Runtime and PyTorch may differ by float32 rounding, and a nearest-code score may
# pick a slightly different neighbour among near-equal ones: both move a score by a tiny
# part of the spread of the scores, and change no ranking or decision. An export bug moves
# scores by a large part of it. So parity is judged at the scores' own scale, the larger
# of the inter-decile range (90th minus 10th percentile) and the standard deviation of the
# batch's PyTorch scores (its largest |score| when both are 0), plus the same ranking and
# the same decisions at the threshold for every pair and input that PyTorch separates by
# more than that tolerated error. Neither a relative-to-max check nor the interquartile
# range survives a batch whose validation half repeats training rows: their nearest-code
# scores are 0, and the float32 error of an encoder (~2e-4 for a KDD MEMGAN) is then the
# whole IQR. 5% of the spread is far above float32 rounding and far below what a wrong
# graph does.
PARITY_TOLERANCE = 5e-2
RECONSTRUCTION_TOLERANCE = 1e-3


class ParityError(ValueError):
    """ONNX Runtime and PyTorch disagree on a real batch beyond the tolerance."""


@dataclass(frozen=True)
class Parity:
    """How far ONNX Runtime's scores are from PyTorch's on the parity batch."""

    max_abs: float  # largest |ORT - PyTorch| score difference
    spread: float  # the scale it is judged at (see PARITY_TOLERANCE)
    max_rel: float  # largest difference over the largest |score| (the manifest's record)
    inverted: int  # pairs PyTorch orders by more than the tolerated error, ORT the other way
    flipped: int  # decisions at the threshold that differ, away from the threshold
    recon_abs: float  # largest |ORT - PyTorch| reconstruction difference

    @property
    def error(self) -> float:
        return self.max_abs / self.spread

    def problems(self, tolerance: float) -> list[str]:
        out = []
        if not self.error <= tolerance:
            out.append(
                f"scores differ by {self.error:.2e} of their spread ({self.max_abs:.3g} "
                f"absolute, spread {self.spread:.3g}; tolerance {tolerance:g})"
            )
        if self.inverted:
            out.append(f"{self.inverted} pair(s) of inputs rank the other way")
        if self.flipped:
            out.append(f"{self.flipped} decision(s) at the threshold differ")
        if not self.recon_abs <= RECONSTRUCTION_TOLERANCE:
            out.append(
                f"reconstructions differ by {self.recon_abs:.2e} "
                f"(tolerance {RECONSTRUCTION_TOLERANCE:g})"
            )
        return out


def _spread(scores: np.ndarray) -> float:
    s = scores.astype(np.float64)
    q90, q10 = np.percentile(s, [90, 10])
    for candidate in (max(q90 - q10, s.std()), np.abs(s).max()):
        if candidate > 0:
            return float(candidate)
    return 1.0


def compare(
    pt_score: np.ndarray,
    ort_score: np.ndarray,
    pt_recon: np.ndarray | None,
    ort_recon: np.ndarray | None,
    threshold: float | None = None,
    tolerance: float = PARITY_TOLERANCE,
) -> Parity:
    pt = np.asarray(pt_score, dtype=np.float64).reshape(-1)
    ort = np.asarray(ort_score, dtype=np.float64).reshape(-1)
    diff = np.abs(ort - pt)
    max_abs = float(diff.max()) if diff.size else 0.0
    spread = _spread(pt)
    noise = tolerance * spread
    gap_pt, gap_ort = pt[:, None] - pt[None, :], ort[:, None] - ort[None, :]
    inverted = int(np.count_nonzero((gap_pt > noise) & (gap_ort < 0)))
    flipped = 0
    if threshold is not None:
        # A score within the tolerated error of the threshold may land on either side.
        clear = np.abs(pt - threshold) > noise
        flipped = int(np.count_nonzero(((pt > threshold) != (ort > threshold)) & clear))
    recon = np.zeros(0)
    if pt_recon is not None and ort_recon is not None:
        recon = np.abs(np.asarray(ort_recon, np.float64) - np.asarray(pt_recon, np.float64))
    return Parity(
        max_abs=max_abs,
        spread=spread,
        max_rel=max_abs / max(float(np.max(np.abs(pt))) if pt.size else 0.0, 1e-12),
        inverted=inverted,
        flipped=flipped,
        recon_abs=float(recon.max()) if recon.size else 0.0,
    )


def export_onnx(
    scorer: torch.nn.Module,
    batch: torch.Tensor,
    path: Path,
    *,
    threshold: float | None = None,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Export `scorer` (x -> (score [N], reconstruction), or (score,) for a model that
    does not reconstruct) in eval mode with a dynamic batch axis and check ONNX Runtime
    against PyTorch on `batch` (see PARITY_TOLERANCE); return the largest score difference
    relative to the largest |score| (for the manifest)."""
    scorer = scorer.eval().cpu()
    batch = batch.detach().float().cpu()
    with torch.no_grad():
        pt = [t.numpy() for t in scorer(batch)]
    names = [SCORE_NAME, RECONSTRUCTION_NAME][: len(pt)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            scorer,
            (batch,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_shapes={"x": {0: torch.export.Dim("N", min=1, max=65536)}},
            opset_version=EXPORT_OPSET,
            verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check_io(session.get_inputs(), session.get_outputs(), tuple(batch.shape[1:]))
    got = session.run(names, {INPUT_NAME: batch.numpy()})
    pt_score, pt_recon = pt[0], (pt[1] if len(pt) > 1 else None)
    ort_recon = got[1] if len(got) > 1 else None
    parity = compare(pt_score, got[0], pt_recon, ort_recon, threshold, tolerance)
    problems = parity.problems(tolerance)
    if problems:
        raise ParityError(
            f"ONNX Runtime differs from PyTorch on {len(pt_score)} real inputs: "
            + "; ".join(problems)
        )
    return parity.max_rel


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
