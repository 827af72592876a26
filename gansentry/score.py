"""`gansentry score MODEL_DIR INPUT --out scores.csv`: score a whole table (CSV, NPZ) or
image folder offline with an exported model, as the service would score the same inputs.

Same code path as `POST /score`, without the service: the manifest is verified the same
way (schema, sha256 of the graph, the ONNX I/O contract), each CSV or NPZ row becomes the
record a JSON client would send (numbers as numbers, symbolic fields as their text) and
goes through `gansentry.preprocessing.screen_record` with the model's `unknown_policy`,
each image file through `decode_image`, and batches run on an ONNX Runtime CPU session.
No torch, no service import: it runs wherever the model repository does.

The output has one line per input, in input order: `row` (the data row's index, 0-based)
or `file`, then `score`, `is_anomaly` (1 when `score > threshold`, as served) and, when the
input has labels (`--label-column`, a "label" column, an NPZ's `y`, or normal/ and
anomalous/ subfolders), `label`, and, for a model whose policy is `anomaly`, `reason` (why
a row is flagged whatever its score); AUROC and F1 against those labels are printed last.
A score that comes out NaN or Inf is a bad row, as it is a 422 in the service.
A bad row stops the run with one error line naming the row and field (exit 2), unless
`--skip-bad-rows`, which reports each on stderr, leaves it out of the output and exits 1."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gansentry.contract import (
    INPUT_NAME,
    MODEL_FILE,
    SCORE_NAME,
    ContractError,
    check_io,
)
from gansentry.datafiles import (
    DataFileError,
    labelled_image_files,
    parse_labels,
    read_csv_table,
    read_npz_table,
)
from gansentry.manifest import (
    ImageInput,
    ModelFolderError,
    TabularInput,
    TabularPreprocessing,
    load_verified,
)
from gansentry.preprocessing import InputError, decode_image, screen_record

DEFAULT_BATCH = 256
EXIT_SKIPPED = 1


class ScoreError(ValueError):
    """Unusable model folder, input file or row; the message names it."""


class OfflineModel:
    """An exported model folder, verified as the service verifies it before serving."""

    def __init__(self, directory: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.directory = Path(directory)
        try:
            self.manifest = load_verified(self.directory)
        except ModelFolderError as e:
            raise ScoreError(f"{self.directory}: {e}") from e
        onnx_path = self.directory / MODEL_FILE
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(onnx_path), opts, providers=["CPUExecutionProvider"]
            )
            check_io(self.session.get_inputs(), self.session.get_outputs(), self.spec.shape)
        except ContractError as e:
            raise ScoreError(f"{onnx_path}: I/O contract: {e}") from e
        except Exception as e:  # ORT raises its own exception types for corrupt graphs
            raise ScoreError(f"{onnx_path}: ONNX Runtime cannot load it: {e}") from e

    @property
    def spec(self) -> ImageInput | TabularInput:
        return self.manifest.input

    @property
    def threshold(self) -> float:
        return self.manifest.threshold.value

    def scores(self, x: np.ndarray) -> np.ndarray:
        (score,) = self.session.run([SCORE_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
        return score.reshape(-1)


@dataclass
class Source:
    """The inputs of one file or folder: `encode(i)` gives input i as a model input and,
    under the model's `anomaly` policy, why it is flagged regardless of its score (None
    otherwise), or raises InputError (the message names the field); `where(i)` names
    input i for a user (file and line, or the image's path). `flags` says whether the
    model's policy can flag inputs at all, which adds a `reason` column."""

    key: str
    ids: list[str]
    labels: np.ndarray | None
    encode: Callable[[int], tuple[np.ndarray, str | None]]
    where: Callable[[int], str]
    flags: bool = False

    def __len__(self) -> int:
        return len(self.ids)


def _record(record: dict[str, object], prep: TabularPreprocessing) -> tuple[np.ndarray, str | None]:
    """The service's record screening (`service.inputs`), with the model's policy."""
    screened = screen_record(record, prep)
    return screened.x, screened.verdict(prep.unknown_policy)


def _csv_source(path: Path, spec: TabularInput, label_column: str | None) -> Source:
    prep = spec.preprocessing
    if prep is None:
        raise ScoreError(
            f"model has no record preprocessing in its manifest: a CSV of raw records "
            f"cannot be encoded; give an NPZ of its {spec.num_features} features"
        )
    table = read_csv_table(path)
    model_fields = {c.name for c in prep.columns}
    if label_column is None and "label" in model_fields:
        label = None  # the model reads a field named "label": it is not the label column
    else:
        label = table.label_column(label_column)
    labels = None
    if label is not None:
        labels, _ = parse_labels(table.column(label), f"{path}: column {label!r}")
    numeric = {c.name for c in prep.columns if c.kind == "numeric"}
    fields = [(j, h) for j, h in enumerate(table.header) if h != label]

    def encode(i: int) -> tuple[np.ndarray, str | None]:
        row = table.rows[i]
        record: dict[str, object] = {}
        for j, name in fields:
            text = row[j]
            if name in numeric:
                try:
                    record[name] = float(text)
                except ValueError:
                    raise InputError(f"field {name!r} must be a number, got {text!r}") from None
            else:
                record[name] = text
        return _record(record, prep)

    return Source(
        key="row",
        ids=[str(i) for i in range(len(table.rows))],
        labels=labels,
        encode=encode,
        where=lambda i: f"{path} line {table.lines[i]} (row {i})",
        flags=prep.unknown_policy == "anomaly",
    )


def _npz_source(path: Path, spec: TabularInput, label_column: str | None) -> Source:
    t = read_npz_table(path, label_column)
    prep = spec.preprocessing
    if prep is None:
        if t.x.shape[1] != spec.num_features:
            raise ScoreError(
                f"{path}: {t.x.shape[1]} features per row, the model takes {spec.num_features}"
            )

        def encode(i: int) -> tuple[np.ndarray, str | None]:
            return t.x[i].astype(np.float32), None

    else:

        def encode(i: int) -> tuple[np.ndarray, str | None]:
            return _record(dict(zip(t.names, t.x[i].tolist(), strict=True)), prep)

    return Source(
        key="row",
        ids=[str(i) for i in range(len(t.x))],
        labels=t.labels,
        encode=encode,
        where=lambda i: f"{path} row {i}",
        flags=prep is not None and prep.unknown_policy == "anomaly",
    )


def _folder_source(path: Path, spec: ImageInput) -> Source:
    files, labels = labelled_image_files(path)
    if not files:
        raise ScoreError(f"{path}: no images (png, jpg, ...) found")
    return Source(
        key="file",
        ids=[f.relative_to(path).as_posix() for f in files],
        labels=labels,
        encode=lambda i: (decode_image(files[i].read_bytes(), spec), None),
        where=lambda i: str(files[i]),
    )


def open_source(path: Path, spec: ImageInput | TabularInput, label_column: str | None) -> Source:
    if not path.exists():
        raise ScoreError(f"{path}: no such file or folder")
    if path.is_dir():
        if not isinstance(spec, ImageInput):
            raise ScoreError(f"{path}: the model takes table rows, not an image folder")
        if label_column is not None:
            raise ScoreError(
                "--label-column applies to tables; a folder's labels are its normal/ and "
                "anomalous/ subfolders"
            )
        return _folder_source(path, spec)
    if isinstance(spec, ImageInput):
        raise ScoreError(f"{path}: the model takes images: give a folder of image files")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _npz_source(path, spec, label_column)
    if suffix == ".csv":
        return _csv_source(path, spec, label_column)
    raise ScoreError(f"{path}: unsupported input; use a .csv, an .npz or an image folder")


@dataclass
class ScoreSummary:
    scored: int
    skipped: int
    scores: np.ndarray
    labels: np.ndarray | None


def score_source(
    model: OfflineModel,
    source: Source,
    out: Path,
    *,
    batch_size: int = DEFAULT_BATCH,
    skip_bad_rows: bool = False,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> ScoreSummary:
    """Score every input of `source` in batches and write the output CSV (see module doc).
    The file is written to a temporary name and renamed, so a stopped run leaves none."""
    from tqdm import tqdm

    header = [source.key, "score", "is_anomaly"] + (["label"] if source.labels is not None else [])
    header += ["reason"] if source.flags else []
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    kept_scores: list[np.ndarray] = []
    kept_rows: list[int] = []
    skipped = 0
    # Shown on a terminal only (disable=None): logs and pipes get the result lines alone.
    bar = tqdm(
        total=len(source),
        unit=source.key,
        file=sys.stderr,
        disable=None if progress else True,
        leave=False,
    )
    if warn is None:
        warn = lambda line: tqdm.write(line, file=sys.stderr)  # noqa: E731

    def bad(i: int, message: str, error: Exception | None = None) -> None:
        """A bad input stops the run with one line naming it, or is skipped and reported."""
        nonlocal skipped
        message = f"{source.where(i)}: {message}"
        if not skip_bad_rows:
            raise ScoreError(message) from error
        warn(f"skipped {message}")
        skipped += 1

    try:
        with open(partial, "w", newline="") as f:
            f.write(",".join(header) + "\n")
            for start in range(0, len(source), batch_size):
                rows, xs, reasons = [], [], []
                for i in range(start, min(start + batch_size, len(source))):
                    try:
                        x, reason = source.encode(i)
                    except (InputError, OSError) as e:
                        bad(i, str(e), e)
                        continue
                    xs.append(x)
                    reasons.append(reason)
                    rows.append(i)
                scores = model.scores(np.stack(xs)) if rows else np.zeros(0, np.float32)
                kept = []
                for i, s, reason in zip(rows, scores, reasons, strict=True):
                    # As the service: a non-finite score is an error, never "normal".
                    if not np.isfinite(s):
                        bad(i, "the model's score is NaN or Inf for this input")
                        continue
                    cells = [_csv_cell(source.ids[i]), repr(float(s))]
                    cells.append("1" if s > model.threshold or reason is not None else "0")
                    if source.labels is not None:
                        cells.append(str(int(source.labels[i])))
                    if source.flags:
                        cells.append(_csv_cell(reason or ""))
                    f.write(",".join(cells) + "\n")
                    kept.append((i, s))
                kept_scores.append(np.array([s for _, s in kept], np.float32))
                kept_rows += [i for i, _ in kept]
                bar.update(min(batch_size, len(source) - start))
        partial.replace(out)
    finally:
        bar.close()
        partial.unlink(missing_ok=True)
    scores = np.concatenate(kept_scores) if kept_scores else np.zeros(0, np.float32)
    labels = None if source.labels is None else source.labels[kept_rows]
    return ScoreSummary(len(kept_rows), skipped, scores, labels)


def _csv_cell(text: str) -> str:
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def metrics_line(summary: ScoreSummary, threshold: float) -> str:
    """AUROC and F1 at the model's threshold, computed by `gansentry evaluate`'s own
    metrics code (scikit-learn, from the `train` extra)."""
    assert summary.labels is not None
    try:
        from training.metrics import evaluate_scores, metrics_note
    except ImportError:
        return "AUROC/F1 need scikit-learn: pip install 'gansentry[train]'"
    m = evaluate_scores(summary.scores, summary.labels, threshold, None)

    def shown(key: str) -> str:
        v = m.get(key)
        return "null" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    line = (
        f"AUROC {shown('auroc')}  F1 {shown('f1')}  precision {shown('precision')}  "
        f"recall {shown('recall')}  (threshold {threshold:.6g}; {summary.scored} rows, "
        f"{int(summary.labels.sum())} anomalous)"
    )
    note = metrics_note(m)
    return line + (f"\n  null metrics: {note}" if note else "")


# ---------------------------------------------------------------- the command


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score a CSV, NPZ or image folder offline with an exported model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="models/NAME/VERSION")
    p.add_argument("input", type=Path, metavar="INPUT", help="a .csv, an .npz or an image folder")
    p.add_argument("--out", type=Path, required=True, help="output CSV, e.g. scores.csv")
    p.add_argument("--label-column", help="CSV column / NPZ array with 0/1 or normal/other labels")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: its own)")
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="report bad rows on stderr and leave them out (exit 1) instead of stopping",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_score)


def run_score(args: argparse.Namespace) -> int:
    from gansentry.cli import CliError

    if args.batch_size < 1:
        raise CliError(f"--batch-size must be positive, got {args.batch_size}")
    try:
        model = OfflineModel(args.model_dir, threads=args.threads)
        source = open_source(args.input, model.spec, args.label_column)
        summary = score_source(
            model,
            source,
            args.out,
            batch_size=args.batch_size,
            skip_bad_rows=args.skip_bad_rows,
            progress=not args.no_progress,
        )
    except (ScoreError, DataFileError) as e:
        raise CliError(str(e)) from e
    m = model.manifest
    flagged = int((summary.scores > model.threshold).sum())
    print(
        f"{summary.scored} {source.key}s scored by {m.name}/{m.version}, {flagged} flagged "
        f"(score > {model.threshold:.6g}) -> {args.out}"
    )
    if summary.labels is not None and summary.scored:
        print(metrics_line(summary, model.threshold))
    if summary.skipped:
        print(f"{summary.skipped} bad {source.key}s skipped (listed above)", file=sys.stderr)
        return EXIT_SKIPPED
    return 0
