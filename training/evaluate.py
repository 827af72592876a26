"""`gansentry evaluate`: score a test split with a training run (PyTorch) or with an
exported model (ONNX Runtime on the CPU, exactly as the service runs it), compute the
papers' metrics and write the report folder.

The exported-model path is the offline ground truth for the service: it loads the folder
with the service's own `load_model` and calls `LoadedModel.run`, so a served score and an
offline score of the same input come from the same session code."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from gansentry.contract import MANIFEST_FILE
from gansentry.manifest import ImageInput, TabularInput, TabularPreprocessing, Threshold
from training import metrics as metrics_mod
from training import report

SCORE_BATCH = 256
# Test normals a multi-modal model's mode picture draws from (Q runs on each).
MODE_NORMALS = 2000
METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.csv"

ScoreFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


class EvaluationError(ValueError):
    """A run or model folder that cannot be evaluated; the message names the file."""


@dataclass(frozen=True)
class DataRequest:
    """Everything `load_splits` needs to rebuild the split a model was trained on; or, with
    `whole`, a table or image folder to score whole (every row a test sample)."""

    dataset: str
    protocol: str | None = None
    normal_class: str | None = None
    split_seed: int | None = None
    root: Path | None = None
    image_size: int | None = None
    channels: int | None = None
    label_column: str | None = None
    symbolic_columns: list[str] | None = None
    max_train: int | None = None
    preprocessing: TabularPreprocessing | None = None
    val_fraction: float = 0.1
    test: str | None = None
    # A run's kept validation and test data (training.runs.DATA_FILE), used when present.
    cached: Path | None = None
    whole: bool = False
    spec: ImageInput | TabularInput | None = None

    def load(self, download: bool = False) -> Any:
        if self.whole and self.spec is not None:
            from training.data.custom import whole_test_set

            return whole_test_set(Path(self.dataset).expanduser(), self.spec, self.label_column)
        if self.cached is not None and self.cached.is_file():
            from training.runs import load_split_data

            return load_split_data(self.cached)
        from training.data import load_splits

        return load_splits(
            self.dataset,
            self.protocol,
            normal_class=self.normal_class,
            root=self.root,
            split_seed=self.split_seed,
            image_size=self.image_size,
            channels=self.channels,
            download=download,
            val_fraction=self.val_fraction,
            label_column=self.label_column,
            symbolic_columns=self.symbolic_columns,
            max_train=self.max_train,
            preprocessing=self.preprocessing,
            test=self.test,
        )

    def override(
        self,
        *,
        dataset: str | None = None,
        protocol: str | None = None,
        normal_class: str | None = None,
        split_seed: int | None = None,
        root: Path | None = None,
    ) -> DataRequest:
        """A dataset named explicitly that is the user's own table or folder is scored
        whole, never re-split; any other change rebuilds the split instead of using the
        run's kept data."""
        changes: dict[str, Any] = {
            k: v
            for k, v in {
                "dataset": dataset,
                "protocol": protocol,
                "normal_class": normal_class,
                "split_seed": split_seed,
                "root": root,
            }.items()
            if v is not None
        }
        if dataset is not None or protocol is not None or normal_class is not None:
            changes["cached"] = None
            changes["test"] = None
        if split_seed is not None:
            changes["cached"] = None
        if dataset is not None:
            from training.data.splits import ALIASES, DATASETS, is_own_data

            name = dataset.strip().lower()
            name = ALIASES.get(name, name)
            path = Path(dataset).expanduser()
            changes["whole"] = name not in DATASETS and path.exists() and is_own_data(name, path)
        return replace(self, **changes)


def data_options(cfg: Any, split_seed: int | None) -> dict[str, str | int | float | None]:
    """The data options a run was trained with, stored in the manifest's provenance
    hyperparameters so an exported model's split can be rebuilt without the run folder."""
    sym = config_value(cfg, "symbolic_columns")
    return {
        "split_seed": split_seed,
        "normal_class": _str_or_none(config_value(cfg, "normal_class")),
        "max_train": config_value(cfg, "max_train"),
        "label_column": config_value(cfg, "label_column"),
        "symbolic_columns": ",".join(sym) if sym else None,
        "val_fraction": config_value(cfg, "val_fraction", 0.1),
        "test": _str_or_none(config_value(cfg, "test")),
    }


@dataclass
class Target:
    kind: str
    path: Path
    label: str
    spec: ImageInput | TabularInput
    threshold: Threshold
    data: DataRequest
    score: ScoreFn
    visuals: Callable[[], dict[str, np.ndarray]] = field(default=lambda: {})
    # A multi-modal model's real normals by inferred mode and its samples per mode (only a
    # run folder has the generator; see `report.modes_png`).
    mode_samples: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None
    default_report_dir: Path = Path("report")
    # The heat-map colour scale of an exported model with anomaly maps (its manifest's).
    map_vmax: float | None = None


@dataclass
class EvalResult:
    target: str
    kind: str
    dataset: str
    protocol: str | None
    normal_classes: list[str]
    anomalous_classes: list[str]
    split_seed: int | None
    metrics: dict[str, float | None]
    report_dir: str
    files: list[str]
    per_class: list[dict] = field(default_factory=list)
    metrics_note: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=None, sort_keys=False)


def config_value(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def score_batches(run: ScoreFn, x: np.ndarray, batch_size: int = SCORE_BATCH):
    """Score `x` in fixed-size batches; returns (scores [N], reconstructions, or None from
    a model that does not reconstruct)."""
    if len(x) == 0:
        return np.zeros(0, np.float32), np.zeros((0, *x.shape[1:]), np.float32)
    scores, recons = [], []
    for i in range(0, len(x), batch_size):
        s, r = run(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32))
        scores.append(np.asarray(s, dtype=np.float32).reshape(-1))
        if r is not None:
            recons.append(np.asarray(r, dtype=np.float32))
    return np.concatenate(scores), (np.concatenate(recons) if recons else None)


def cpu_session(onnx_path: Path, sample_shape: tuple[int, ...]) -> ScoreFn:
    """An ONNX Runtime CPU session built by the service's own session factory."""
    from gansentry.contract import INPUT_NAME, RECONSTRUCTION_NAME, SCORE_NAME
    from service.providers import create_session
    from service.settings import Settings

    session, _ = create_session(onnx_path, Settings(providers="cpu"), sample_shape)
    has_recon = RECONSTRUCTION_NAME in {o.name for o in session.get_outputs()}
    names = [SCORE_NAME, RECONSTRUCTION_NAME] if has_recon else [SCORE_NAME]

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        got = session.run(names, {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
        return got[0].reshape(-1), (got[1] if has_recon else None)

    return run


def open_model_dir(path: Path) -> Target:
    from service.registry import ModelLoadError, load_model
    from service.settings import Settings

    try:
        loaded = load_model(path, Settings(providers="cpu"))
    except ModelLoadError as e:
        raise EvaluationError(f"{path}: {e}") from e
    m = loaded.manifest
    prov, spec = m.provenance, m.input
    hp = prov.hyperparameters
    normal_class = hp.get("normal_class")
    if normal_class is None and len(prov.normal_classes) == 1:
        normal_class = prov.normal_classes[0]
    sym = hp.get("symbolic_columns")
    if sym is None and isinstance(spec, TabularInput) and spec.preprocessing is not None:
        sym = ",".join(c.name for c in spec.preprocessing.columns if c.kind == "symbolic")
    data = DataRequest(
        dataset=prov.dataset,
        protocol=prov.protocol,
        normal_class=None if normal_class is None else str(normal_class),
        split_seed=_int_or_none(hp.get("split_seed")),
        image_size=spec.height if isinstance(spec, ImageInput) else None,
        channels=spec.channels if isinstance(spec, ImageInput) else None,
        label_column=_str_or_none(hp.get("label_column")),
        symbolic_columns=str(sym).split(",") if sym else None,
        max_train=_int_or_none(hp.get("max_train")),
        preprocessing=spec.preprocessing if isinstance(spec, TabularInput) else None,
        val_fraction=float(hp.get("val_fraction") or 0.1),
        test=_str_or_none(hp.get("test")),
        spec=spec,
    )
    return Target(
        kind="model",
        path=path,
        label=f"{m.name}/{m.version}",
        spec=spec,
        threshold=m.threshold,
        data=data,
        score=loaded.run,
        default_report_dir=Path("reports") / f"{m.name}-v{m.version}",
        map_vmax=m.anomaly_map.vmax if m.anomaly_map is not None else None,
    )


def run_request(info: Any) -> DataRequest:
    """The split a run was trained on, from its recorded config and provenance; for own
    data, the validation and test data the run folder kept, if it is there."""
    from training.runs import DATA_FILE, RUN_DIR_KEY

    cfg, spec = info.config, info.input_spec
    run_dir = info.extra.get(RUN_DIR_KEY)
    return DataRequest(
        dataset=str(info.dataset or config_value(cfg, "dataset")),
        protocol=info.protocol or config_value(cfg, "protocol"),
        normal_class=_str_or_none(config_value(cfg, "normal_class")),
        split_seed=info.split_seed,
        root=config_value(cfg, "data_root"),
        image_size=spec.height if isinstance(spec, ImageInput) else config_value(cfg, "image_size"),
        channels=spec.channels if isinstance(spec, ImageInput) else None,
        label_column=config_value(cfg, "label_column"),
        symbolic_columns=config_value(cfg, "symbolic_columns"),
        max_train=config_value(cfg, "max_train"),
        preprocessing=spec.preprocessing if isinstance(spec, TabularInput) else None,
        val_fraction=float(config_value(cfg, "val_fraction", 0.1) or 0.1),
        test=config_value(cfg, "test"),
        cached=Path(run_dir) / DATA_FILE if run_dir else None,
        spec=spec,
    )


def open_run_dir(path: Path, device: str = "cpu") -> Target:
    import torch

    from training.runs import load_run, score_array

    model, info = load_run(path, device=device)
    spec = info.input_spec
    data = run_request(info)

    def score(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return score_array(model, x, batch_size=SCORE_BATCH)

    def visuals() -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = model.visuals() if hasattr(model, "visuals") else {}
        return {k: v.detach().float().cpu().numpy() for k, v in (out or {}).items()}

    def mode_samples(normals: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.as_tensor(normals, device=device)
        with torch.no_grad():
            out = model.mode_samples(x)
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

    return Target(
        kind="run",
        path=path,
        label=str(path),
        spec=spec,
        threshold=info.threshold,
        data=data,
        score=score,
        visuals=visuals,
        mode_samples=mode_samples if hasattr(model, "mode_samples") else None,
        default_report_dir=path / "report",
    )


def open_target(path: Path, device: str = "cpu") -> Target:
    path = Path(path)
    if not path.is_dir():
        raise EvaluationError(f"{path}: no such run or model folder")
    if (path / MANIFEST_FILE).is_file():
        return open_model_dir(path)
    return open_run_dir(path, device=device)


def check_compatible(
    spec: ImageInput | TabularInput, data_spec: ImageInput | TabularInput, dataset: str
) -> None:
    """The test data must be what the model was trained on: same shape and, for tables,
    the same features in the same order (tables are encoded with the model's own
    preprocessing, so scaling cannot differ)."""
    if tuple(data_spec.shape) != tuple(spec.shape):
        raise EvaluationError(
            f"dataset {dataset} gives samples of shape {list(data_spec.shape)}, "
            f"the model expects {list(spec.shape)}"
        )
    if isinstance(spec, TabularInput) and isinstance(data_spec, TabularInput):
        pairs = zip(data_spec.feature_names, spec.feature_names, strict=True)
        for i, (got, want) in enumerate(pairs):
            if got != want:
                raise EvaluationError(
                    f"dataset {dataset} feature {i} is {got!r}, the model expects {want!r}"
                )


def write_report(
    report_dir: Path,
    test: np.ndarray,
    recons: np.ndarray | None,
    scores: np.ndarray,
    labels: np.ndarray,
    result_metrics: dict[str, float | None],
    visuals: dict[str, np.ndarray],
    map_vmax: float | None = None,
) -> list[Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    auroc = result_metrics.get("auroc")
    files = [report.roc_png(scores, labels, auroc, report_dir / report.ROC_FILE)]
    lines = {"calibrated threshold": float(result_metrics["threshold"] or 0.0)}
    if result_metrics.get("top20_threshold") is not None:
        lines["top-20% rule"] = float(result_metrics["top20_threshold"])
    files.append(report.histogram_png(scores, labels, lines, report_dir / report.HISTOGRAM_FILE))
    idx = report.pick_examples(labels, per_class=8 if test.ndim == 4 else 16)
    if recons is not None:  # a model that does not reconstruct has no pairs and no maps
        pairs = report_dir / report.RECONSTRUCTIONS_FILE
        files.append(
            report.reconstructions_png(test[idx], recons[idx], scores[idx], labels[idx], pairs)
        )
    if recons is not None and test.ndim == 4 and len(idx):
        from training.anomaly_maps import report_maps

        maps, vmax = report_maps(test[idx], recons[idx], labels[idx], map_vmax)
        files.append(
            report.anomaly_maps_png(
                test[idx],
                recons[idx],
                maps,
                vmax,
                scores[idx],
                labels[idx],
                report_dir / report.ANOMALY_MAPS_FILE,
            )
        )
    for name, arr in visuals.items():
        target = report_dir / (report.MEMORY_FILE if name == "memory_units" else f"{name}.png")
        if arr.ndim == 4:
            files.append(report.image_grid_png(arr, name.replace("_", " "), target))
        elif arr.ndim == 2:
            files.append(report.matrix_png(arr, name.replace("_", " "), target))
    return files


def write_scores(path: Path, scores: np.ndarray, labels: np.ndarray) -> Path:
    """Every test sample's score, in test-split order: the offline ground truth that a
    served score for the same input must equal."""
    pairs = enumerate(zip(scores, labels, strict=True))
    rows = "".join(f"{i},{int(y)},{float(s)!r}\n" for i, (s, y) in pairs)
    path.write_text("index,label,score\n" + rows)
    return path


def evaluate(
    path: Path,
    *,
    dataset: str | None = None,
    protocol: str | None = None,
    normal_class: str | None = None,
    split_seed: int | None = None,
    data_root: Path | None = None,
    report_dir: Path | None = None,
    download: bool = False,
    device: str = "cpu",
) -> EvalResult:
    target = open_target(path, device=device)
    request = target.data.override(
        dataset=dataset,
        protocol=protocol,
        normal_class=normal_class,
        split_seed=split_seed,
        root=data_root,
    )
    splits = request.load(download=download)
    test = np.asarray(splits.test, dtype=np.float32)
    labels = np.asarray(splits.test_labels).astype(np.int64).reshape(-1)
    check_compatible(target.spec, splits.input_spec, request.dataset)
    scores, recons = score_batches(target.score, test)
    result_metrics = metrics_mod.evaluate_scores(
        scores, labels, target.threshold.value, splits.protocol
    )
    out_dir = Path(report_dir) if report_dir is not None else target.default_report_dir
    files: list[Path] = []
    if len(test):
        files = write_report(
            out_dir,
            test,
            recons,
            scores,
            labels,
            result_metrics,
            target.visuals(),
            target.map_vmax,
        )
        files.append(write_scores(out_dir / SCORES_FILE, scores, labels))
        normals = test[labels == 0][:MODE_NORMALS]
        if target.mode_samples is not None and len(normals):
            drawn = target.mode_samples(normals)
            files.append(report.modes_png(**drawn, path=out_dir / report.MODES_FILE))
    out_dir.mkdir(parents=True, exist_ok=True)
    per_class: list[dict] = []
    if splits.test_classes is not None and len(test):
        per_class = metrics_mod.per_class(scores, labels, splits.test_classes, result_metrics)
        files.append(report.per_class_png(per_class, out_dir / report.PER_CLASS_FILE))
    result = EvalResult(
        target=target.label,
        kind=target.kind,
        dataset=str(splits.dataset),
        protocol=splits.protocol,
        normal_classes=[str(c) for c in splits.normal_classes],
        anomalous_classes=[str(c) for c in splits.anomalous_classes],
        split_seed=splits.split_seed,
        metrics=result_metrics,
        report_dir=str(out_dir),
        files=[str(f) for f in files],
        per_class=per_class,
        metrics_note=metrics_mod.metrics_note(result_metrics),
        notes=list(splits.notes),
    )
    (out_dir / METRICS_FILE).write_text(json.dumps(result.__dict__, indent=2) + "\n")
    return result


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)
