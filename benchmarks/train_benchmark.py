"""Training benchmark: the three GANs and two classical baselines on the papers' protocols.

Resumable by design: every finished job is one line in the results file and is skipped on
the next invocation, and an interrupted GAN run resumes from its last epoch checkpoint. So
the work can spread over several sessions in the background, or run on a GPU machine.

    python benchmarks/train_benchmark.py --plan kdd            # KDD99 kdd-dagmm, all models
    python benchmarks/train_benchmark.py --plan mnist --seeds 0 1
    python benchmarks/train_benchmark.py --plan cifar10 --classes 0 1
    python benchmarks/train_benchmark.py --plan cifar10 --hparam contrast_norm=true
    python benchmarks/train_benchmark.py --plan mnist-multimodal --seeds 0 1 2  # 0-4 / 5-9 normal
    python benchmarks/train_benchmark.py --plan tables --tables gen-multimodal --seeds 0 1 2
    python benchmarks/train_benchmark.py --report              # prints the tables
    python benchmarks/write_docs.py                            # renders docs/benchmarks.md

Each job runs in its own process, so its peak RSS is the job's own peak memory."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tables import TABLES, table_splits  # noqa: E402

from training.models import ARCHITECTURES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "train.jsonl"
RUNS = ROOT / "runs" / "bench"
DATA_ROOT = Path(os.environ.get("GANSENTRY_DATA", ROOT.parent / "shared" / "datasets"))
# Every registered architecture is benchmarked; a new model file joins the plans as it is.
GANS = ARCHITECTURES
BASELINES = ("iforest", "ocsvm", "ecod", "knn", "lof")
OCSVM_MAX_TRAIN = 10_000  # kernel SVMs are O(n^2); KDD's train split has ~200k rows
PLANS = {
    "kdd": ("kddcup99", "kdd-dagmm", [None]),
    "mnist": ("mnist", "one-class-normal", [str(c) for c in range(10)]),
    "cifar10": ("cifar10", "one-class-normal", [str(c) for c in range(10)]),
    # A multi-modal normal class (MMOC-GAN's setting): digits 0-4 normal, 5-9 the anomalies,
    # and the reverse; each "class" of the plan is one comma-separated set of normal digits.
    "mnist-multimodal": ("mnist", "one-class-normal", ["0,1,2,3,4", "5,6,7,8,9"]),
    # The tabular benchmark (benchmarks/tables.py): one job per table; kdd-dagmm is the kdd
    # plan's, so its rows are shared with the table above.
    "tables": ("tables", "novelty", [t for t in TABLES if t != "kdd-dagmm"]),
}
PUBLISHED = {
    ("mnist", "one-class-normal"): "Deep SVDD 0.948, OCGAN 0.975 (mean AUROC, 10 classes)",
    ("cifar10", "one-class-normal"): "Deep SVDD 0.648, OCGAN 0.657 (mean AUROC, 10 classes)",
    ("kddcup99", "kdd-dagmm"): (
        "EGBAD paper P 0.920 R 0.958 F1 0.937; survey re-implementation EGBAD P 0.941 "
        "R 0.956 F1 0.949, GANomaly P 0.830 R 0.841 F1 0.836"
    ),
}


def variant(hparams: dict) -> str:
    """How a job's hyperparameters differ from the defaults, as in `--hparam`."""
    return ",".join(
        f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(hparams.items())
    )


def job_key(
    dataset: str, model: str, cls: str | None, seed: int, hparams: dict | None = None
) -> str:
    key = f"{dataset}/{model}/{cls if cls is not None else 'all'}/seed{seed}"
    return f"{key}/{variant(hparams)}" if hparams else key


def label(row: dict) -> str:
    """A results row's model as the tables name it: the model, then any variant."""
    return f"{row['model']} ({variant(row['hparams'])})" if row.get("hparams") else row["model"]


def image_size(dataset: str) -> int | None:
    """Images at the papers' 32x32; tables as they are."""
    return 32 if dataset in ("mnist", "fashion-mnist", "cifar10") else None


def job_splits(dataset: str, protocol: str, cls: str | None, seed: int = 0):
    """A job's splits; on the tables plan the split varies with the seed."""
    from training.data import load_splits

    if dataset == "tables":
        return table_splits(str(cls), seed, DATA_ROOT)
    size = image_size(dataset)
    return load_splits(dataset, protocol, normal_class=cls, root=DATA_ROOT, image_size=size)


def gan_config(spec: dict, out: Path, *, resume: bool):
    """The TrainConfig of a GAN job (`spec` as `plan_jobs` makes it)."""
    from training.train import TrainConfig

    return TrainConfig(
        model=spec["model"],
        dataset=spec["dataset"],
        protocol=spec["protocol"],
        normal_class=spec["cls"],
        seed=spec["seed"],
        out=out,
        resume=resume,
        data_root=DATA_ROOT,
        image_size=image_size(spec["dataset"]),
        epochs=spec.get("epochs"),
        hparams=dict(spec.get("hparams") or {}),
    )


def contrast_normalised(x):
    """Baselines see the same per-image contrast normalisation as the GANs' graphs."""
    import torch

    from training.models.base import AnomalyGAN

    return AnomalyGAN._contrast(torch.as_tensor(x))[0].numpy()


def done_keys() -> set[str]:
    if not RESULTS.exists():
        return set()
    return {json.loads(line)["key"] for line in RESULTS.read_text().splitlines() if line.strip()}


class _ECOD:
    """ECOD (Li et al. 2022, "Unsupervised Outlier Detection Using Empirical Cumulative
    Distribution Functions"), as PyOD computes it, fitted on the training normals only:
    per feature, the negative log of the left and right tail probabilities under the
    training rows' empirical distribution (smoothed, so values beyond every training row
    stay finite), the tail chosen by the feature's skewness, summed over features. Written
    here because PyOD pulls numba for this one formula."""

    def fit(self, x):
        import numpy as np
        from scipy.stats import skew

        self.sorted = np.sort(x, axis=0)
        with np.errstate(all="ignore"):
            self.skew_sign = np.sign(np.nan_to_num(skew(x, axis=0)))
        return self

    def decision_function(self, x):
        import numpy as np

        n = len(self.sorted)
        cols = range(x.shape[1])
        below = np.stack([np.searchsorted(self.sorted[:, j], x[:, j], "right") for j in cols], 1)
        above = n - np.stack([np.searchsorted(self.sorted[:, j], x[:, j], "left") for j in cols], 1)
        u_left = -np.log((below + 1) / (n + 1))
        u_right = -np.log((above + 1) / (n + 1))
        s = self.skew_sign
        u_skew = u_left * -np.sign(s - 1) + u_right * np.sign(s + 1)
        return -np.maximum(u_skew, (u_left + u_right) / 2).sum(axis=1)


class _NearestDistance:
    """A fitted NearestNeighbors behind scikit-learn's outlier interface (higher
    decision_function = more normal), like the other baselines."""

    def __init__(self, nn):
        self.nn = nn

    def fit(self, x):
        self.nn.fit(x)
        return self

    def decision_function(self, x):
        return -self.nn.kneighbors(x, return_distance=True)[0][:, 0]


def run_one(spec: dict) -> dict:
    """One job, in this (child) process."""
    import numpy as np

    from training.metrics import evaluate_scores

    dataset, protocol, model, cls, seed = (
        spec["dataset"],
        spec["protocol"],
        spec["model"],
        spec["cls"],
        spec["seed"],
    )
    splits = job_splits(dataset, protocol, cls, seed)
    t0 = time.perf_counter()
    extra: dict = {}
    hparams = dict(spec.get("hparams") or {})
    if model in GANS:
        import torch

        from training.runs import load_run, score_array
        from training.train import train

        out = RUNS / spec["key"].replace("/", "_")
        run_dir = train(gan_config(spec, out, resume=out.exists()), splits=splits, progress=False)
        gpu = torch.cuda.is_available()
        net, info = load_run(run_dir, "cuda" if gpu else "cpu")
        scores, _ = score_array(net, splits.test)
        threshold = info.threshold.value
        train_seconds = info.training_seconds
        extra = {
            "epochs": info.epochs_done,
            "selected_epoch": info.selected_epoch,
            "run_dir": str(run_dir.relative_to(ROOT)),
            # Rows trained on a GPU say so: their seconds are not the 2-core budget's.
            **({"device": torch.cuda.get_device_name()} if gpu else {}),
        }
    else:
        from sklearn.ensemble import IsolationForest
        from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors
        from sklearn.svm import OneClassSVM

        unknown = set(hparams) - {"contrast_norm"}
        if unknown:
            raise SystemExit(f"baselines take only contrast_norm, got {sorted(unknown)}")
        prep = contrast_normalised if hparams.get("contrast_norm") else (lambda a: a)
        flat = lambda a: prep(a).reshape(len(a), -1)  # noqa: E731
        x = flat(splits.train)
        if model == "iforest":
            est = IsolationForest(n_estimators=100, random_state=seed, n_jobs=1)
        elif model == "ecod":
            est = _ECOD()
        elif model == "knn":
            # EGBAD's tabular score on raw inputs: distance to the nearest distinct training
            # row, so the table shows what the encoder adds.
            x = np.unique(x, axis=0)
            est = _NearestDistance(NearestNeighbors(n_neighbors=1))
        elif model == "lof":
            # Local outlier factor at scikit-learn's default 20 neighbours, on the distinct
            # training inputs: the pixel-space counterpart of MMOC-GAN's image score.
            x = np.unique(x, axis=0)
            est = LocalOutlierFactor(n_neighbors=20, novelty=True)
        else:
            rng = np.random.default_rng(seed)
            if len(x) > OCSVM_MAX_TRAIN:
                x = x[rng.choice(len(x), OCSVM_MAX_TRAIN, replace=False)]
                extra["train_subsample"] = OCSVM_MAX_TRAIN
            est = OneClassSVM(kernel="rbf", gamma="scale", nu=0.1)
        est.fit(x)
        train_seconds = time.perf_counter() - t0
        scores = -est.decision_function(flat(splits.test))
        threshold = float(np.quantile(-est.decision_function(flat(splits.val)), 0.99))
    metrics = evaluate_scores(scores, splits.test_labels, threshold, splits.protocol)
    return {
        **spec,
        "metrics": metrics,
        "train_seconds": round(train_seconds, 1),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "n_train": int(len(splits.train)),
        "n_test": int(len(splits.test)),
        **extra,
    }


def plan_jobs(args: argparse.Namespace) -> list[dict]:
    jobs = []
    for plan in args.plan:
        dataset, protocol, classes = PLANS[plan]
        classes = args.classes or classes
        if protocol == "kdd-dagmm":
            classes = [None]
        if plan == "tables" and args.tables:
            classes = args.tables
        for seed in args.seeds:
            for cls in classes:
                for model in args.models:
                    key = job_key(dataset, model, cls, seed, args.hparams)
                    jobs.append(
                        {
                            "key": key,
                            "dataset": dataset,
                            "protocol": protocol,
                            "model": model,
                            "cls": cls,
                            "seed": seed,
                            "epochs": args.epochs,
                            **({"hparams": args.hparams} if args.hparams else {}),
                        }
                    )
    return jobs


LOCKS = RUNS / "locks"


def run_plan(args: argparse.Namespace) -> None:
    """Several invocations can share one plan (e.g. one per core): the results file is
    read afresh before each job, and a lock file marks a job another invocation is running
    (a killed invocation leaves its lock: delete runs/bench/locks/ before restarting)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    LOCKS.mkdir(parents=True, exist_ok=True)
    for job in plan_jobs(args):
        if job["key"] in done_keys():
            print(f"skip {job['key']} (in {RESULTS.name})", flush=True)
            continue
        lock = LOCKS / (job["key"].replace("/", "_") + ".lock")
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            print(f"skip {job['key']} (running elsewhere: {lock.name})", flush=True)
            continue
        print(f"run  {job['key']}", flush=True)
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(job)],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if proc.returncode != 0:
                print(f"FAIL {job['key']}: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result.update(host=platform.node(), cpus=os.cpu_count(), finished=time.time())
            with RESULTS.open("a") as f:
                f.write(json.dumps(result) + "\n")
        finally:
            lock.unlink(missing_ok=True)
        m = result["metrics"]
        print(
            f"done {job['key']}: auroc={m.get('auroc')} f1={m.get('f1')} "
            f"top20_f1={m.get('top20_f1')} {result['train_seconds']}s",
            flush=True,
        )


# ------------------------------------------------------------------ report


def _mean_sd(values: list[float]) -> str:
    import numpy as np

    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def read_rows(path: Path = RESULTS) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def model_labels(rows: list[dict]) -> list[str]:
    order = [*GANS, *BASELINES]
    return sorted({label(r) for r in rows}, key=lambda m: (order.index(m.split(" ")[0]), m))


def kdd_table(rows: list[dict], title: str) -> list[str]:
    """The kdd-dagmm rows of `rows`: one line per model, mean ± sd over its seeds."""
    sel = [r for r in rows if r["dataset"] == "kddcup99"]
    if not sel:
        return []
    out = [
        f"### {title}",
        "",
        f"Published: {PUBLISHED['kddcup99', 'kdd-dagmm']}.",
        "",
        "| model | seeds | precision (top 20%) | recall (top 20%) | F1 (top 20%) | "
        "AUROC | F1 at calibrated threshold |",
        "|---" * 7 + "|",
    ]
    for model in model_labels(sel):
        ms = [r["metrics"] for r in sel if label(r) == model]
        out.append(
            f"| {model} | {len(ms)} | {_mean_sd([m['top20_precision'] for m in ms])} | "
            f"{_mean_sd([m['top20_recall'] for m in ms])} | "
            f"{_mean_sd([m['top20_f1'] for m in ms])} | "
            f"{_mean_sd([m['auroc'] for m in ms])} | {_mean_sd([m['f1'] for m in ms])} |"
        )
    return [*out, ""]


REPORT_SEEDS = range(5)  # dev seeds (5-8) never enter the report tables


def is_multimodal(row: dict) -> bool:
    """A row of the mnist-multimodal plan: several normal digits, comma-separated."""
    return "," in str(row.get("cls"))


def digits_label(cls: str) -> str:
    """ "0,1,2,3,4" -> "0-4 normal" (a run of consecutive digits), else the list."""
    digits = [int(c) for c in cls.split(",")]
    if digits == list(range(digits[0], digits[0] + len(digits))):
        return f"{digits[0]}-{digits[-1]} normal"
    return f"{cls} normal"


def multimodal_table(rows: list[dict]) -> list[str]:
    """MNIST with several normal digits (the mnist-multimodal plan): AUROC per split, mean ±
    sd over the report seeds, beside each model's one-class mean over single digits."""
    import numpy as np

    sel = [
        r
        for r in rows
        if r["dataset"] == "mnist" and is_multimodal(r) and r["seed"] in REPORT_SEEDS
    ]
    if not sel:
        return []
    splits = [c for c in PLANS["mnist-multimodal"][2] if any(r["cls"] == c for r in sel)]
    splits += sorted({r["cls"] for r in sel} - set(splits))
    single = [
        r
        for r in rows
        if r["dataset"] == "mnist"
        and not is_multimodal(r)
        and r["cls"] is not None
        and r["seed"] in REPORT_SEEDS
    ]
    out = [
        "### MNIST with a multi-modal normal class (mnist-multimodal plan)",
        "",
        "`python benchmarks/train_benchmark.py --plan mnist-multimodal --seeds 0 1 2`: "
        "one-class-normal with several normal digits (`--normal-class 0,1,2,3,4`), trained on "
        "their train images, tested on the full test split with the other digits as "
        "anomalies (about half of it). Cells: AUROC, mean ± sample std over the report seeds "
        "(how many in brackets); development seeds (5 and up) are not in this table. The last "
        "column is the same model's mean AUROC over the single normal digits of the MNIST "
        "table above, for comparison.",
        "",
        "| model | " + " | ".join(digits_label(c) for c in splits) + " | one-class mean |",
        "|---" * (len(splits) + 2) + "|",
    ]
    for model in model_labels(sel):
        cells = []
        for c in splits:
            vals = [r["metrics"]["auroc"] for r in sel if label(r) == model and r["cls"] == c]
            cells.append(f"{_mean_sd(vals)} ({len(vals)})" if vals else "-")
        one = [r["metrics"]["auroc"] for r in single if label(r) == model]
        cells.append(f"{np.mean(one):.3f}" if one else "-")
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    return [*out, ""]


def table_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """Table name -> its report-seed rows; kdd-dagmm's are the kdd plan's."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["seed"] not in REPORT_SEEDS:
            continue
        if r["dataset"] == "tables":
            out.setdefault(r["cls"], []).append(r)
        elif r["dataset"] == "kddcup99" and r["protocol"] == "kdd-dagmm":
            out.setdefault("kdd-dagmm", []).append(r)
    return out


def tables_table(rows: list[dict], metric: str, title: str) -> list[str]:
    """One line per model: `metric` per table (mean ± sd over seeds), the mean over
    tables and the worst table."""
    import numpy as np

    by_table = table_rows(rows)
    names = [t for t in TABLES if t in by_table]
    if not names:
        return []
    sel = [r for t in names for r in by_table[t] if not r.get("hparams")]
    out = [
        f"### {title}",
        "",
        "| model | " + " | ".join(names) + " | mean over tables | worst table |",
        "|---" * (len(names) + 3) + "|",
    ]
    for model in model_labels(sel):
        cells, means = [], []
        for t in names:
            vals = [r["metrics"][metric] for r in by_table[t] if label(r) == model]
            vals = [v for v in vals if v is not None]
            cells.append(f"{_mean_sd(vals)} ({len(vals)})" if vals else "-")
            if vals:
                means.append(float(np.mean(vals)))
        if len(means) == len(names):
            summary = f"**{np.mean(means):.3f}** | {min(means):.3f}"
        else:
            summary = f"({len(means)}/{len(names)} tables) | -"
        out.append(f"| {model} | " + " | ".join(cells) + f" | {summary} |")
    return [*out, ""]


def report(rows: list[dict] | None = None) -> str:
    """The markdown tables of `rows` (default: the results file)."""
    import numpy as np

    rows = read_rows() if rows is None else rows
    out = [
        "## Training benchmark",
        "",
        "Generated by `python benchmarks/train_benchmark.py --report` from "
        f"`{RESULTS.relative_to(ROOT)}`; jobs ran on this project's CI-class machine "
        "(2 CPU cores, no GPU), or on an NVIDIA H200 where the time table says so, with "
        "each model's default hyperparameters (registered beside its code in "
        "`training/models/<name>.py`), except where a row names a variant: "
        "`contrast_norm=true` normalises each image's mean and L1 contrast first (Deep SVDD's "
        "CIFAR-10 preprocessing), for the baselines too. Baselines (IsolationForest, OC-SVM, "
        "knn: distance to the nearest distinct training input, and lof: local outlier "
        "factor over 20 neighbours) ran on the same split "
        "in the same benchmark. Published figures are from the papers "
        "(same protocol). f-AnoGAN's paper reports retinal OCT scans only, and MMOC-GAN's "
        "one manufacturing data set (3,936 pass and 22 fail records), so neither has a "
        "published figure on these protocols. "
        "CIFAR-10 here is a JPEG-recompressed copy: pixel values differ slightly from the "
        "official batches.",
        "",
    ]
    models = model_labels(rows)
    for dataset, protocol in (("mnist", "one-class-normal"), ("cifar10", "one-class-normal")):
        sel = [
            r
            for r in rows
            if r["dataset"] == dataset and not is_multimodal(r) and r["seed"] in REPORT_SEEDS
        ]
        if not sel:
            continue
        out += [
            f"### {dataset} {protocol}: AUROC per normal class",
            "",
            f"Published: {PUBLISHED[dataset, protocol]}.",
            "",
            "Development seeds (5 and up) are not in this table.",
            "",
            "| model | " + " | ".join(str(c) for c in range(10)) + " | mean of classes run |",
            "|---" * 12 + "|",
        ]
        for model in models:
            cells, means = [], []
            for c in range(10):
                vals = [
                    r["metrics"]["auroc"] for r in sel if label(r) == model and r["cls"] == str(c)
                ]
                cells.append(_mean_sd(vals))
                if vals:
                    means.append(float(np.mean(vals)))
            if means:
                note = f"{np.mean(means):.3f} ({len(means)}/10)"
                out.append(f"| {model} | " + " | ".join(cells) + f" | {note} |")
        out += ["", "Cells: mean ± sample std over seeds where more than one seed ran.", ""]
    out += multimodal_table(rows)
    out += kdd_table(rows, "KDD Cup 99 (10%), kdd-dagmm protocol")
    out += [
        "### Tabular benchmark",
        "",
        "`python benchmarks/train_benchmark.py --plan tables --seeds 0 1 2` (the tables are "
        "described in `benchmarks/tables.py`): novelty protocol, trained on normal rows only, "
        "validation normals for checkpoint selection and the threshold, every method on the "
        "same split, which varies with the seed (kdd-dagmm: the kdd plan's rows, seeds 0-4, "
        "fixed split). GANs with their default tabular hyperparameters only (variants are in "
        "the KDD table above). Cells: mean ± sample "
        "std over the report seeds (how many in brackets). Development seeds (5-8) are not "
        "in these tables.",
        "",
        *tables_table(rows, "auroc", "AUROC"),
        *tables_table(rows, "f1", "F1 at the calibrated threshold (what `is_anomaly` gives)"),
    ]
    out += [
        "### Training time and peak memory",
        "",
        "Jobs that shared the cores with others ran slower (see the notes above), so the "
        "range matters as much as the median. Budget: every GAN job trained its model's "
        "default number of epochs (or the `epochs=` its row names), with no `--time-budget`; "
        "the column shows the epochs run. Rows rescored from another run's weights "
        "(`benchmarks/rescore.py`) trained nothing: they count on their source's line only.",
        "",
        "| dataset | model | trained on | jobs | budget (epochs run) | train seconds (median) | "
        "train seconds (min-max) | peak RSS MB (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    devices = sorted({r.get("device", "2-core CPU") for r in rows}, key=lambda d: d != "2-core CPU")
    for dataset in ("mnist", "mnist-multimodal", "cifar10", "kddcup99", *TABLES):
        for model in models:
            for device in devices:
                sel = [
                    r
                    for r in rows
                    if _time_group(r) == dataset
                    and "rescored_from" not in r
                    and label(r) == model
                    and r.get("device", "2-core CPU") == device
                ]
                if not sel:
                    continue
                secs = [r["train_seconds"] for r in sel]
                epochs = sorted({r["epochs"] for r in sel if r.get("epochs")})
                budget = "-" if not epochs else ", ".join(str(e) for e in epochs)
                out.append(
                    f"| {dataset} | {model} | {device} | {len(sel)} | {budget} | "
                    f"{np.median(secs):.0f} | {min(secs):.0f}-{max(secs):.0f} | "
                    f"{max(r['peak_memory_mb'] for r in sel):.0f} |"
                )
    return "\n".join(out) + "\n"


def _time_group(row: dict) -> str:
    """The training-time table's line a row belongs to."""
    if row["dataset"] == "tables":
        return row["cls"]
    return "mnist-multimodal" if is_multimodal(row) else row["dataset"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plan", nargs="+", choices=sorted(PLANS), default=[])
    p.add_argument("--models", nargs="+", default=[*GANS, *BASELINES])
    p.add_argument("--classes", nargs="+", default=None)
    p.add_argument("--tables", nargs="+", choices=sorted(TABLES), default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=None, help="default: each model's own")
    p.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyperparameter that differs from the model's default (a separate variant)",
    )
    p.add_argument("--report", action="store_true", help="print the markdown tables")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    from training.cli import parse_hparams

    args.hparams = parse_hparams(args.hparam)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if args.plan:
        run_plan(args)
    if args.report:
        print(report(), end="")


if __name__ == "__main__":
    main()
