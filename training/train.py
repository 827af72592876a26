"""The training loop behind `gansentry train`: seeded, checkpointed every epoch, resumable
exactly, selecting its checkpoint and calibrating its threshold on held-out normal data
only (never on test labels)."""

from __future__ import annotations

import json
import math
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from gansentry.manifest import atomic_write
from training.models import AnomalyGAN, build_model
from training.models.registry import lookup, resolve
from training.runs import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    HISTORY_FILE,
    LAST_CHECKPOINT,
    RUN_FILE,
    SELECTED_CHECKPOINT,
    RunError,
    RunInfo,
    load_checkpoint,
    save_checkpoint,
    save_split_data,
    score_array,
)
from training.thresholds import MAX_RATE_RATIO, calibrate, percentile_name  # noqa: F401

if TYPE_CHECKING:
    from training.data import Splits

# Fields that may change between an interrupted run and its resume.
RESUMABLE_FIELDS = frozenset(
    {"epochs", "time_budget", "resume", "out", "device", "download", "data_root"}
)


@dataclass
class TrainConfig:
    model: str
    dataset: str
    protocol: str | None = None
    normal_class: str | None = None
    epochs: int | None = None
    seed: int = 0
    out: Path = Path("runs/run")
    resume: bool = False
    device: str = "auto"
    batch_size: int | None = None
    lr: float | None = None
    data_root: Path | None = None
    download: bool = False
    image_size: int | None = None
    max_train: int | None = None
    label_column: str | None = None
    symbolic_columns: list[str] | None = None
    log_columns: list[str] | None = None
    threshold_quantile: float = 0.99
    # Minutes of training (run.json's training_seconds, resumed epochs included): epochs
    # continue while one more as long as the last still fits, up to `epochs` if given.
    time_budget: float | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    # Own data only: the share of normal rows held out for checkpoint selection and the
    # threshold, and a table or image folder scored whole as the test set.
    val_fraction: float = 0.1
    test: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise RunError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RunError("device 'cuda' requested but no CUDA GPU is available")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _prepare_dir(out: Path, config: dict[str, Any], resume: bool) -> bool:
    """-> whether a checkpoint exists to resume from. Refuses to mix two runs."""
    config_path = out / CONFIG_FILE
    if config_path.is_file():
        if not resume:
            state = "a finished run" if (out / RUN_FILE).is_file() else "an unfinished run"
            raise RunError(
                f"{out} already holds {state}; pass --resume to continue it or choose another --out"
            )
        try:
            old = json.loads(config_path.read_text())
        except ValueError as e:
            raise RunError(f"{config_path}: corrupt config ({e})") from e
        diff = _config_changes(old, config)
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise RunError(
                f"cannot resume {out}: its {CONFIG_FILE} differs ({changes}); "
                "use the same settings or another --out"
            )
        atomic_write(config_path, json.dumps(config, indent=2).encode())
        return (out / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file()
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out} exists and is not a run directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(config_path, json.dumps(config, indent=2).encode())
    return False


def _load_splits(cfg: TrainConfig) -> Splits:
    from training.data import load_splits

    return load_splits(
        cfg.dataset,
        cfg.protocol,
        normal_class=cfg.normal_class,
        root=cfg.data_root,
        image_size=cfg.image_size,
        download=cfg.download,
        val_fraction=cfg.val_fraction,
        label_column=cfg.label_column,
        symbolic_columns=cfg.symbolic_columns,
        log_columns=cfg.log_columns,
        max_train=cfg.max_train,
        seed=cfg.seed,
        test=cfg.test,
    )


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The run records data paths absolute, so evaluate and export find them from any
    working directory (names of public datasets stay names)."""

    from training.data.splits import ALIASES, DATASETS

    def resolved(value: str | None) -> str | None:
        if value is None or value.strip().lower() in (*DATASETS, *ALIASES):
            return value
        if not Path(value).expanduser().exists():
            return value
        return str(Path(value).expanduser().resolve())

    root = None if cfg.data_root is None else Path(cfg.data_root).expanduser().resolve()
    return replace(cfg, dataset=resolved(cfg.dataset), test=resolved(cfg.test), data_root=root)


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Fields that differ between a run's recorded config and a resume's; a field the old
    config lacks (written before the field existed) counts as its default."""
    defaults = TrainConfig(model="", dataset="").to_dict()
    return sorted(
        k
        for k in set(old) | set(new)
        if k not in RESUMABLE_FIELDS and old.get(k, defaults.get(k)) != new.get(k)
    )


def report_split(splits: Splits) -> None:
    """The row counts and split decisions, on stderr (stdout is left for the run's path)."""
    c = splits.counts()
    tqdm.write(
        f"data: {c['train']} train, {c['validation']} validation, "
        f"{c['test_normal']} test normal, {c['test_anomalous']} test anomalous",
        file=sys.stderr,
    )
    for note in splits.notes:
        tqdm.write(f"  {note}", file=sys.stderr)


def resolve_hparams(cfg: TrainConfig, spec: Any) -> dict[str, Any]:
    """The model's defaults with the run's overrides (`--hparam`, then `--epochs`,
    `--batch-size`, `--lr`), validated by the model's registered hyperparameter types."""
    overrides = dict(cfg.hparams)
    for key in ("epochs", "batch_size", "lr"):
        if getattr(cfg, key) is not None:
            overrides[key] = getattr(cfg, key)
    try:
        return resolve(cfg.model, spec, overrides)
    except ValueError as e:
        raise RunError(str(e)) from None


def _val_stats(model: AnomalyGAN, val: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    model.eval()
    scores, metrics = [], []
    with torch.no_grad():
        for i in range(0, len(val), batch_size):
            xb = val[i : i + batch_size]
            if not model.score_is_fitted:
                scores.append(model.score(xb)[0])
            metrics.append(model.selection_metric(xb))
    model.train()
    stats = {"val_selection_metric": float(torch.cat(metrics).mean())}
    if scores:
        stats["val_score_mean"] = float(torch.cat(scores).mean())
    return stats


def _run_epoch(
    model: AnomalyGAN,
    train: torch.Tensor,
    batch_size: int,
    gen: torch.Generator,
    desc: str,
    progress: bool,
) -> dict[str, float]:
    n = len(train)
    bs = min(batch_size, n)
    # Full batches only: a final batch of one sample would break BatchNorm.
    steps = n // bs
    perm = torch.randperm(n, generator=gen).to(train.device)
    sums: dict[str, float] = {}
    # Per loss: a loss reported on some steps only (a generator updated every n-th step)
    # is averaged over the steps that report it.
    counts: dict[str, int] = {}
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        losses = model.training_step(train[perm[step * bs : (step + 1) * bs]])
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
    return {f"loss_{k}": v / counts[k] for k, v in sums.items()}


EpochHook = Callable[[dict[str, Any], AnomalyGAN], None]


def train(
    cfg: TrainConfig,
    splits: Splits | None = None,
    progress: bool = True,
    on_epoch: EpochHook | None = None,
    on_split: Callable[[Splits], None] | None = None,
) -> Path:
    """Train (or resume) the run in `cfg.out` and return the run directory. `on_epoch(row,
    model)` runs after each epoch's checkpoint with that epoch's history row and the model
    in eval mode, so diagnostics (`benchmarks/epoch_trace.py`) can look at every epoch,
    not only the selected one. `on_split(splits)` sees the data once it is loaded (the CLI
    prints its row counts and split decisions with `report_split`)."""
    try:
        lookup(cfg.model)
    except ValueError as e:
        raise RunError(str(e)) from None
    if not 0.0 < cfg.threshold_quantile < 1.0:
        raise RunError(f"threshold_quantile must be in (0, 1), got {cfg.threshold_quantile}")
    if cfg.time_budget is not None and not cfg.time_budget > 0:
        raise RunError(f"time_budget must be positive minutes, got {cfg.time_budget}")
    cfg = absolute_paths(cfg)
    out = Path(cfg.out)
    config = {**cfg.to_dict(), "resume": False}
    device = resolve_device(cfg.device)
    if splits is None:
        splits = _load_splits(cfg)
    if len(splits.train) == 0 or len(splits.val) == 0:
        raise RunError(
            f"{splits.dataset}: need training and validation normals, got "
            f"{len(splits.train)} and {len(splits.val)}"
        )
    h = resolve_hparams(cfg, splits.input_spec)
    resuming = _prepare_dir(out, config, cfg.resume)
    if splits.protocol == "custom":
        # The user's file may be gone by export time: keep the held-out data it needs.
        save_split_data(out, splits)
    if on_split is not None:
        on_split(splits)

    threads = torch.get_num_threads()
    if device.type == "cpu" and splits.input_spec.kind == "tabular":
        # Tabular nets are tiny: extra threads only add synchronisation, which on a
        # shared machine costs more than the maths.
        torch.set_num_threads(1)
    try:
        return _train(cfg, splits, out, config, device, h, resuming, progress, on_epoch)
    finally:
        torch.set_num_threads(threads)


def _train(
    cfg: TrainConfig,
    splits: Splits,
    out: Path,
    config: dict[str, Any],
    device: torch.device,
    h: dict[str, Any],
    resuming: bool,
    progress: bool,
    on_epoch: EpochHook | None = None,
) -> Path:
    seed_everything(cfg.seed)
    model = build_model(cfg.model, splits.input_spec, **h).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "metric": float("inf")}
    seconds, peak = 0.0, 0.0
    ckpt_dir = out / CHECKPOINT_DIR
    if resuming:
        state = load_checkpoint(ckpt_dir / LAST_CHECKPOINT, str(device))
        model.load_training_state(state["model_state"])
        gen.set_state(state["shuffle_rng"].cpu())
        _set_rng_state(state["rng"])
        history, best = state["history"], state["best"]
        seconds, peak = state["training_seconds"], state["peak_memory_mb"]

    train_x = torch.as_tensor(splits.train, dtype=torch.float32, device=device)
    if not resuming:
        model.fit_input_space(train_x)
    val_x = torch.as_tensor(splits.val, dtype=torch.float32, device=device)
    epochs = h["epochs"]
    if h.get("min_steps") and cfg.epochs is None:
        # A model that declares `min_steps` trains at least that many batches whatever the
        # table's size: its default epochs are meant for thousands of rows, and on a few
        # hundred they are a few dozen updates. An explicit --epochs is taken as given.
        per_epoch = math.ceil(len(train_x) / h["batch_size"])
        epochs = max(epochs, math.ceil(h["min_steps"] / per_epoch))
    budget = None if cfg.time_budget is None else cfg.time_budget * 60.0
    if budget is not None and cfg.epochs is None:
        epochs = sys.maxsize  # the budget alone decides; the default schedule does not cap it
    plan = model.phase_plan()
    epoch = len(history)
    while (phase := _next_phase(plan, history, epochs, budget)) is not None:
        if phase and model.phase != phase:
            model.start_phase(phase)
        epoch += 1
        t0 = time.perf_counter()
        of = f"/{epochs}" if epochs != sys.maxsize else f" (budget {cfg.time_budget:g} min)"
        of += f" [{phase}]" if phase else ""
        losses = _run_epoch(
            model, train_x, h["batch_size"], gen, f"{cfg.model} epoch {epoch}{of}", progress
        )
        tag = {"phase": phase} if phase else {}
        row = {"epoch": epoch, **tag, **losses, **_val_stats(model, val_x)}
        seconds += time.perf_counter() - t0
        row["seconds"] = round(seconds, 3)
        history.append(row)
        peak = max(peak, _peak_memory_mb())
        # Only the last phase trains everything the score uses (f-AnoGAN's encoder).
        selectable = not plan or phase == plan[-1][0]
        if selectable and row["val_selection_metric"] <= best["metric"]:
            best = {"epoch": epoch, "metric": row["val_selection_metric"]}
            save_checkpoint(
                ckpt_dir / SELECTED_CHECKPOINT, {"epoch": epoch, "model": model.state_dict()}
            )
        save_checkpoint(
            ckpt_dir / LAST_CHECKPOINT,
            {
                "epoch": epoch,
                "model_state": model.training_state(),
                "shuffle_rng": gen.get_state(),
                "rng": _rng_state(),
                "history": history,
                "best": best,
                "training_seconds": seconds,
                "peak_memory_mb": peak,
            },
        )
        atomic_write(out / HISTORY_FILE, "".join(json.dumps(r) + "\n" for r in history).encode())
        if progress:
            shown = {k: f"{v:.4g}" for k, v in row.items() if k != "epoch"}
            tqdm.write(f"{cfg.model} epoch {epoch}{of}: {shown}")
        if on_epoch is not None:
            # Random draws inside the hook (building a scoring copy initialises weights)
            # must not shift the training run's random streams.
            rng = _rng_state()
            model.eval()
            with torch.no_grad():
                on_epoch(row, model)
            model.train()
            _set_rng_state(rng)

    return _finish(out, cfg, config, splits, model, h, history, best, seconds, peak, device)


def _next_phase(
    plan: list[tuple[str, int]],
    history: list[dict[str, Any]],
    epochs: int,
    budget: float | None,
) -> str | None:
    """The phase of the next epoch ("" for a model without phases), or None when training
    is done. The epoch counter runs on across phases; each history row names its phase, so
    a resumed run continues inside the phase it stopped in. Each phase trains its own epoch
    count, then hands over to the next; a phase once left is not re-entered. A time budget
    is shared by the phases in proportion to their epoch counts: phase k ends once another
    epoch would end past the first k shares (without --epochs the budget alone ends it).
    Every phase trains at least one epoch, so the last, which the checkpoint is selected
    from, always runs."""
    if not plan:
        return "" if len(history) < epochs and not _over_budget(budget, history) else None
    names = [name for name, _ in plan]
    total = sum(count for _, count in plan)
    current = names.index(history[-1]["phase"]) if history else 0
    for k in range(current, len(plan)):
        name, count = plan[k]
        trained = sum(1 for row in history if row.get("phase") == name)
        if trained == 0:
            return name
        share = None if budget is None else budget * sum(n for _, n in plan[: k + 1]) / total
        capped = epochs != sys.maxsize
        if (trained < count or not capped) and not _over_budget(share, history):
            return name
    return None


def _over_budget(budget: float | None, history: list[dict[str, Any]]) -> bool:
    """Whether another epoch, as long as the last one, would end past the budget. The last
    epoch, not the mean: the first one also pays one-off start-up costs, and a shared
    machine's load changes. The first epoch always runs: a run needs a checkpoint."""
    if budget is None or not history:
        return False
    seconds = history[-1]["seconds"]
    last = seconds - (history[-2]["seconds"] if len(history) > 1 else 0.0)
    return seconds + last > budget


def _finish(
    out: Path,
    cfg: TrainConfig,
    config: dict[str, Any],
    splits: Splits,
    model: AnomalyGAN,
    h: dict[str, Any],
    history: list[dict[str, Any]],
    best: dict[str, Any],
    seconds: float,
    peak: float,
    device: torch.device,
) -> Path:
    """Load the selected weights, fit the score on the training normals (if it needs it),
    calibrate the threshold on validation normals, and
    write run.json (whose presence marks the run finished)."""
    selected = load_checkpoint(out / CHECKPOINT_DIR / SELECTED_CHECKPOINT, str(device))
    model.load_state_dict(selected["model"])
    if model.fit_score(torch.as_tensor(splits.train, dtype=torch.float32, device=device)):
        selected["model"] = model.state_dict()
        save_checkpoint(out / CHECKPOINT_DIR / SELECTED_CHECKPOINT, selected)
    scores, _ = score_array(model, splits.val)
    # A tie at the quantile is moved to the side that flags the asked share of normals;
    # when no threshold can (the score does not rank the normals apart) the run keeps the
    # nearest one and says so, so it can still be exported with a rate it can give.
    threshold = calibrate(
        scores,
        quantile=cfg.threshold_quantile,
        source=f"validation-normal scores (epoch {selected['epoch']})",
        strict=False,
    )
    assert threshold.validation is not None
    realised, asked = threshold.validation.flagged_fraction, 1.0 - cfg.threshold_quantile
    if not asked / MAX_RATE_RATIO <= realised <= asked * MAX_RATE_RATIO:
        print(
            f"warning: the threshold flags {realised:.3%} of validation normals, not the "
            f"{asked:.3%} asked ({threshold.rule}); export with --target-fpr to choose "
            "another rate",
            file=sys.stderr,
        )
    info = RunInfo(
        config=config,
        input_spec=splits.input_spec,
        threshold=threshold,
        selected_epoch=int(selected["epoch"]),
        epochs_done=len(history),
        training_seconds=round(seconds, 3),
        peak_memory_mb=round(peak, 1),
        history=history,
        dataset=splits.dataset,
        protocol=splits.protocol,
        normal_classes=[str(c) for c in splits.normal_classes],
        anomalous_classes=[str(c) for c in splits.anomalous_classes],
        split_seed=int(splits.split_seed),
        seed=cfg.seed,
        git_commit=git_commit(),
        hparams=h,
        arch=cfg.model,
        selection_rule=model.selection_rule,
        device=str(device),
    )
    atomic_write(out / RUN_FILE, info.to_json().encode())
    return out
