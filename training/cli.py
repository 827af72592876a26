"""`gansentry train|evaluate|export|add-anomaly-map`. Arguments are declared here without
importing torch; each command imports the training code only when it runs.

Bad input from the layers below (DataError, ValueError, missing files) becomes one
CliError line naming the problem; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gansentry.cli import CliError

DEVICES = ("auto", "cpu", "cuda")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the training code's bad-input exceptions into one CLI error line."""
    from pydantic import ValidationError

    try:
        yield
    except CliError:
        raise
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CliError(f"{where}: {first['msg']}") from e
    except FileNotFoundError as e:
        name = e.filename or str(e)
        raise CliError(f"{name}: file not found") from e
    except (ValueError, OSError) as e:
        raise CliError(one_line(str(e).strip("'\"")) or type(e).__name__) from e


def one_line(message: str, limit: int = 400) -> str:
    """Messages from lower layers may quote multi-line library errors; the CLI prints one."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _columns(text: str | None) -> list[str] | None:
    if text is None:
        return None
    cols = [c.strip() for c in text.split(",") if c.strip()]
    return cols or None


def _data_args(p: argparse.ArgumentParser, *, defaults_from_run: bool) -> None:
    hint = " (default: the run's/manifest's)" if defaults_from_run else ""
    p.add_argument(
        "--dataset",
        required=not defaults_from_run,
        help="mnist, fashion-mnist, cifar10, kddcup99, or a path to an image folder, CSV or NPZ"
        + hint,
    )
    p.add_argument(
        "--protocol",
        help="one-class-normal, one-class-anomalous, kdd-dagmm or custom" + hint,
    )
    p.add_argument(
        "--normal-class",
        help="the protocol's class, e.g. 3 or cat; one-class-normal takes several, "
        "comma-separated (0,1,2,3,4: a multi-modal normal class)" + hint,
    )
    p.add_argument("--data-root", type=Path, help="folder holding the datasets")
    p.add_argument("--download", action="store_true", help="fetch public datasets if missing")


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a GAN anomaly detector into a run folder")
    # The architectures register themselves when the training code is imported, which this
    # module avoids (the service's CLI loads it too): an unknown name is answered with the list.
    t.add_argument(
        "--model",
        required=True,
        metavar="ARCH",
        help="a registered architecture, e.g. ganomaly (an unknown name lists them all)",
    )
    _data_args(t, defaults_from_run=False)
    t.add_argument(
        "--epochs",
        type=int,
        help="default: the model's paper schedule (a model that trains in phases, such as "
        "fanogan, shares this total between them in proportion)",
    )
    t.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed; also splits your own data (public protocols keep their fixed split)",
    )
    t.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of the normal rows held out to select the checkpoint and the threshold "
        "(default 0.1)",
    )
    t.add_argument(
        "--test",
        help="a labelled table (CSV/NPZ) or image folder (normal/, anomalous/) to test on, "
        "scored whole; read with the same --label-column and --symbolic-columns",
    )
    t.add_argument("--out", type=Path, required=True, help="run folder, e.g. runs/NAME")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument("--device", default="auto", metavar="{" + ",".join(DEVICES) + "}")
    t.add_argument("--image-size", type=int, help="resize images to N x N")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--max-train", type=int, help="use at most N training samples")
    t.add_argument("--label-column", help="CSV/NPZ column with 0/1 or normal/anomalous labels")
    t.add_argument("--symbolic-columns", help="comma-separated CSV columns to one-hot encode")
    t.add_argument(
        "--log-columns",
        help="comma-separated numeric columns to scale as log(1 + v): heavy-tailed counts "
        "such as bytes or durations",
    )
    t.add_argument("--threshold-quantile", type=float, default=0.99)
    t.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="train as many epochs as fit in MINUTES (capped by --epochs if given); "
        "--resume with a larger budget trains on",
    )
    t.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model hyperparameter, e.g. latent_dim=16 or enc_hidden=[32] (repeatable)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(run=run_train)

    e = sub.add_parser("evaluate", help="metrics and report for a run or an exported model")
    e.add_argument("target", type=Path, metavar="RUN_OR_MODEL_DIR")
    _data_args(e, defaults_from_run=True)
    e.add_argument("--seed", type=int, help="split seed (default: the run's/manifest's)")
    e.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    e.add_argument("--report-dir", type=Path, help="default: RUN/report or reports/NAME-vN")
    e.add_argument("--device", default="cpu", metavar="{" + ",".join(DEVICES) + "}")
    e.set_defaults(run=run_evaluate)

    x = sub.add_parser("export", help="publish a run as models/NAME/VERSION (ONNX + manifest)")
    x.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    x.add_argument("--models-dir", type=Path, default=Path("models"))
    x.add_argument("--name", required=True, help="model name, e.g. mnist-memgan")
    x.add_argument("--data-root", type=Path, help="folder holding the datasets")
    rule = x.add_mutually_exclusive_group()
    rule.add_argument(
        "--threshold-quantile",
        type=float,
        metavar="Q",
        help="recalibrate the threshold as the Q quantile of the exported graph's "
        "validation-normal scores (default: keep the run's threshold)",
    )
    rule.add_argument(
        "--target-fpr",
        type=float,
        metavar="F",
        help="recalibrate the threshold to flag a share F of validation normals, e.g. 0.01",
    )
    x.add_argument(
        "--unknown-policy",
        metavar="{reject,anomaly}",
        help="what the service does with a record value the model does not know (unseen "
        "category, wrong type, far out of range): reject = 422 naming it (default), "
        "anomaly = score it, flag it and say why",
    )
    x.add_argument(
        "--parity-tolerance",
        type=float,
        metavar="T",
        help="largest ONNX-vs-PyTorch score difference accepted, as a fraction of the spread "
        "(interquartile range) of the scores (default 0.05)",
    )
    x.set_defaults(run=run_export)

    a = sub.add_parser(
        "add-anomaly-map",
        help="publish an exported image model again, as its next version, with anomaly maps",
    )
    a.add_argument("model_dir", type=Path, metavar="MODELS_DIR/NAME/VERSION")
    a.add_argument(
        "--models-dir", type=Path, help="where to publish (default: the folder's own repository)"
    )
    a.add_argument("--data-root", type=Path, help="folder holding the datasets")
    a.add_argument(
        "--calibrate-dataset",
        metavar="DATASET",
        help="calibrate the heat-map colour scale on this dataset's validation normals "
        "(default: the model's own split, rebuilt from its manifest)",
    )
    a.add_argument("--download", action="store_true", help="fetch public datasets if missing")
    a.set_defaults(run=run_add_anomaly_map)


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise CliError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _positive(value: int | float | None, what: str) -> None:
    if value is not None and value <= 0:
        raise CliError(f"{what} must be positive, got {value}")


def parse_hparams(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is read as JSON (numbers, lists, true/false) or kept a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--hparam {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def run_train(args: argparse.Namespace) -> int:
    _check_choice(args.device, DEVICES, "device")
    for value, what in (
        (args.epochs, "--epochs"),
        (args.batch_size, "--batch-size"),
        (args.lr, "--lr"),
        (args.max_train, "--max-train"),
        (args.image_size, "--image-size"),
        (args.time_budget, "--time-budget"),
    ):
        _positive(value, what)
    if not 0 < args.threshold_quantile < 1:
        raise CliError(f"--threshold-quantile must be in (0, 1), got {args.threshold_quantile}")
    if not 0 < args.val_fraction < 0.5:
        raise CliError(f"--val-fraction must be between 0 and 0.5, got {args.val_fraction}")
    hparams = parse_hparams(args.hparam)
    with user_errors():
        from training.train import TrainConfig, report_split, train

        cfg = TrainConfig(
            model=args.model,
            dataset=args.dataset,
            protocol=args.protocol,
            normal_class=args.normal_class,
            epochs=args.epochs,
            seed=args.seed,
            out=args.out,
            resume=args.resume,
            device=args.device,
            batch_size=args.batch_size,
            lr=args.lr,
            data_root=args.data_root,
            download=args.download,
            image_size=args.image_size,
            max_train=args.max_train,
            label_column=args.label_column,
            symbolic_columns=_columns(args.symbolic_columns),
            log_columns=_columns(args.log_columns),
            threshold_quantile=args.threshold_quantile,
            time_budget=args.time_budget,
            hparams=hparams,
            val_fraction=args.val_fraction,
            test=args.test,
        )
        run_dir = train(cfg, progress=not args.no_progress, on_split=report_split)
    run_dir = Path(run_dir).resolve()
    print(
        f"run saved in {run_dir}; export it with: gansentry export {run_dir} --name NAME",
        file=sys.stderr,
    )
    print(run_dir)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    _check_choice(args.device, DEVICES, "device")
    with user_errors():
        from training.evaluate import evaluate

        result = evaluate(
            args.target,
            dataset=args.dataset,
            protocol=args.protocol,
            normal_class=args.normal_class,
            split_seed=args.seed,
            data_root=args.data_root,
            report_dir=args.report_dir,
            download=args.download,
            device=args.device,
        )
    if args.json:
        print(result.to_json())
        return 0
    print(f"{result.target} on {result.dataset} ({result.protocol}), report in {result.report_dir}")
    for note in result.notes:
        print(f"  {note}")
    for key, value in result.metrics.items():
        shown = "null" if value is None else f"{value:.0f}" if key == "n_test" else f"{value:.4f}"
        print(f"  {key:24s} {shown}")
    if result.metrics_note:
        print(f"  null metrics: {result.metrics_note}")
    from training.metrics import worst_classes

    worst = worst_classes(result.per_class, 10)
    if worst:
        rules = " / ".join(worst[0]["errors"])
        print(f"  errors by test class ({rules}):")
        for r in worst:
            kind = "anomaly, missed" if r["anomalous"] else "normal class, flagged"
            counts = " / ".join(str(v) for v in r["errors"].values())
            print(f"    {r['class']:22s} {counts} of {r['n']} ({kind})")
    sys.stdout.flush()
    return 0


def run_export(args: argparse.Namespace) -> int:
    if args.unknown_policy is not None:
        _check_choice(args.unknown_policy, ("reject", "anomaly"), "--unknown-policy")
    for value, what in (
        (args.threshold_quantile, "--threshold-quantile"),
        (args.target_fpr, "--target-fpr"),
    ):
        if value is not None and not 0 < value < 1:
            raise CliError(f"{what} must be in (0, 1), got {value}")
    if args.parity_tolerance is not None and not args.parity_tolerance >= 0:
        raise CliError(f"--parity-tolerance must be >= 0, got {args.parity_tolerance}")
    with user_errors():
        from training.export import export_run

        manifest, path = export_run(
            args.run_dir,
            args.models_dir,
            args.name,
            data_root=args.data_root,
            threshold_quantile=args.threshold_quantile,
            target_fpr=args.target_fpr,
            unknown_policy=args.unknown_policy,
            parity_tolerance=args.parity_tolerance,
        )
    print(path)
    print(f"  threshold {manifest.threshold.value:.6g}: {manifest.threshold.rule}", file=sys.stderr)
    auroc = manifest.metrics.get("auroc")
    if auroc is not None:
        print(f"  AUROC {auroc:.4f} (ONNX Runtime, test split)", file=sys.stderr)
    return 0


def run_add_anomaly_map(args: argparse.Namespace) -> int:
    with user_errors():
        from training.anomaly_maps import add_anomaly_map

        manifest, path = add_anomaly_map(
            args.model_dir,
            models_dir=args.models_dir,
            data_root=args.data_root,
            dataset=args.calibrate_dataset,
            download=args.download,
        )
    print(path)
    assert manifest.anomaly_map is not None
    print(
        f"  anomaly maps: colour scale 0..{manifest.anomaly_map.vmax:.4g} "
        f"({manifest.anomaly_map.vmax_rule})",
        file=sys.stderr,
    )
    return 0
