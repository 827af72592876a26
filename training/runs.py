"""The run directory written by `gansentry train`, and loading it back.

    RUN/config.json            the TrainConfig (resume refuses a different one)
    RUN/history.jsonl          one line per finished epoch: mean losses, validation scores
                               (and the epoch's phase, for a model that trains in phases)
    RUN/checkpoints/last.pt    everything for an exact resume (weights, optimisers, EMA,
                               RNG states, history, selection state)
    RUN/checkpoints/selected.pt  the weights chosen without test labels
    RUN/run.json               RunInfo, written when training finishes
    RUN/data.npz               own data only: the validation and test inputs (encoded with
                               the fitted preprocessing) and test labels, so evaluate and
                               export work after the user's file is gone

Every file is written to a temporary name and renamed, so an interrupted run never leaves
a half-written checkpoint."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError

from gansentry.manifest import ImageInput, InputSpec, TabularInput, Threshold, atomic_write
from training.models import AnomalyGAN, build_model
from training.models.registry import saved_hparams

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"
RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
SELECTED_CHECKPOINT = "selected.pt"
DATA_FILE = "data.npz"
# RunInfo.extra key holding the folder a run was read from (set on reading, never stored).
RUN_DIR_KEY = "run_dir"

_SPEC = TypeAdapter(InputSpec)


class RunError(ValueError):
    """A run directory is missing, corrupt or incompatible; the message names the file."""


@dataclass
class RunInfo:
    config: dict[str, Any]
    input_spec: ImageInput | TabularInput
    threshold: Threshold
    selected_epoch: int
    epochs_done: int
    training_seconds: float
    peak_memory_mb: float
    history: list[dict[str, Any]]
    dataset: str
    protocol: str
    normal_classes: list[str]
    anomalous_classes: list[str]
    split_seed: int
    seed: int
    git_commit: str | None
    hparams: dict[str, Any]
    arch: str = ""
    selection_rule: str = ""
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["input_spec"] = self.input_spec.model_dump(mode="json")
        d["threshold"] = self.threshold.model_dump(mode="json")
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunInfo:
        d = json.loads(text)
        d["input_spec"] = _SPEC.validate_python(d["input_spec"])
        d["threshold"] = Threshold.model_validate(d["threshold"])
        return cls(**d)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path: Path, device: str = "cpu") -> dict[str, Any]:
    """Checkpoints hold only tensors and plain containers, so they load with
    `weights_only=True`: opening a run directory never executes pickled code."""
    if not path.is_file():
        raise RunError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise RunError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from e


def read_run_info(run_dir: Path) -> RunInfo:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        hint = (
            " (training did not finish; resume it with --resume)"
            if (Path(run_dir) / CONFIG_FILE).is_file()
            else ""
        )
        raise RunError(f"{path}: not found, {run_dir} is not a finished run{hint}")
    try:
        info = RunInfo.from_json(path.read_text())
    except (ValueError, TypeError, KeyError, ValidationError) as e:
        raise RunError(f"{path}: corrupt run file ({type(e).__name__}: {e})") from e
    info.extra[RUN_DIR_KEY] = str(Path(run_dir).resolve())
    return info


def save_split_data(run_dir: Path, splits: Any) -> Path:
    """Keep a run's validation and test data (model inputs, labels, classes) in the run
    folder, with the split's facts, for evaluate and export."""
    meta = {
        "dataset": splits.dataset,
        "protocol": splits.protocol,
        "normal_classes": [str(c) for c in splits.normal_classes],
        "anomalous_classes": [str(c) for c in splits.anomalous_classes],
        "split_seed": splits.split_seed,
        "input_spec": splits.input_spec.model_dump(mode="json"),
        "notes": list(splits.notes),
    }
    arrays = {
        "val": np.asarray(splits.val, np.float32),
        "test": np.asarray(splits.test, np.float32),
        "test_labels": np.asarray(splits.test_labels, np.int64),
        "meta": np.array(json.dumps(meta)),
    }
    if splits.test_classes is not None:
        arrays["test_classes"] = np.asarray(splits.test_classes).astype(str)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path = Path(run_dir) / DATA_FILE
    atomic_write(path, buf.getvalue())
    return path


def load_split_data(path: Path) -> Any:
    """The Splits `save_split_data` kept (its train split empty: nothing needs it again)."""
    from training.data.result import Splits

    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            spec = _SPEC.validate_python(meta["input_spec"])
            return Splits(
                train=np.zeros((0, *spec.shape), np.float32),
                val=z["val"],
                test=z["test"],
                test_labels=z["test_labels"],
                input_spec=spec,
                dataset=meta["dataset"],
                protocol=meta["protocol"],
                normal_classes=meta["normal_classes"],
                anomalous_classes=meta["anomalous_classes"],
                split_seed=meta["split_seed"],
                test_classes=z["test_classes"] if "test_classes" in z.files else None,
                notes=meta["notes"],
            )
    except (OSError, ValueError, KeyError, ValidationError) as e:
        raise RunError(f"{path}: corrupt run data ({type(e).__name__}: {e})") from e


def load_run(run_dir: Path, device: str = "cpu") -> tuple[AnomalyGAN, RunInfo]:
    """-> (model in eval mode with the selected weights, RunInfo)."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    path = run_dir / CHECKPOINT_DIR / SELECTED_CHECKPOINT
    state = load_checkpoint(path, device)
    try:
        arch = info.arch or info.config["model"]
        hparams = saved_hparams(arch, info.input_spec, info.hparams)
        model = build_model(arch, info.input_spec, **hparams)
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise RunError(f"{path}: does not match {run_dir / RUN_FILE} ({e})") from e
    return model.to(device).eval(), info


def score_array(
    model: AnomalyGAN, x: np.ndarray, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray | None]:
    """Score float32 inputs in eval mode, batch by batch -> (scores [N], reconstructions,
    None for a model that does not reconstruct)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores, recons = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                xb = torch.as_tensor(np.ascontiguousarray(x[i : i + batch_size]), device=device)
                s, r = model.score(xb.float())
                scores.append(s.float().cpu().numpy())
                if r is not None:
                    recons.append(r.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not model.reconstructs:
        return np.concatenate(scores) if scores else np.zeros(0, np.float32), None
    if not scores:
        return np.zeros(0, np.float32), np.zeros((0, *x.shape[1:]), np.float32)
    return np.concatenate(scores), np.concatenate(recons)
