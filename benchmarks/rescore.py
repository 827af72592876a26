"""Score finished training-benchmark runs with another score method, on the same weights.

A fitted score (`knn`, `feature-mahalanobis`) needs only the selected checkpoint and the
training normals, and no model's training or checkpoint selection depends on its score
method, so rescoring a run gives the row that training with that score method would: the
same weights, scored, calibrated (the 99th percentile of validation-normal scores, as
training does) and evaluated on the same split. Each new row is the target variant's row,
with `rescored_from` naming the source row, and is skipped if that key already exists.

    python benchmarks/rescore.py --plan cifar10 --models fanogan --seeds 0 1 \\
        --hparam contrast_norm=true --score score_method=feature-mahalanobis

Only runs whose folder is on this machine can be rescored (runs/bench/...).

Development runs (`image_candidates.py`, runs/image-candidates/...) have no results row:
`--run FOLDER ...` scores each with its recorded score and with the overrides, on the
whole test split, and only prints the AUROCs:

    python benchmarks/rescore.py --score knn_relative=20 \\
        --run "runs/image-candidates/mnist_mmocgan_5,6,7,8,9_seed5_d_spectral_norm=true"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_benchmark import RESULTS, ROOT, job_key, job_splits, plan_jobs  # noqa: E402

from training.runs import RUN_FILE  # noqa: E402


def rescored(run_dir: Path, splits, overrides: dict):
    """The run's selected weights with the score `overrides`, fitted on the training
    normals, and the run as recorded (both in eval mode)."""
    import torch

    from training.models import build_model
    from training.runs import load_run

    net, _ = load_run(run_dir)
    model = build_model(net.arch, net.spec, **{**net.hparams, **overrides})
    # The fitted buffers of the target score do not exist in the source checkpoint.
    model.load_state_dict(net.state_dict(), strict=False)
    model.eval()
    model.fit_score(torch.as_tensor(splits.train, dtype=torch.float32))
    return model, net


def rescore(row: dict, overrides: dict) -> dict:
    import numpy as np

    from training.metrics import evaluate_scores
    from training.runs import score_array

    splits = job_splits(row["dataset"], row["protocol"], row["cls"], row["seed"])
    model, _ = rescored(ROOT / row["run_dir"], splits, overrides)
    val, test = score_array(model, splits.val)[0], score_array(model, splits.test)[0]
    threshold = float(np.quantile(val, 0.99))
    hparams = {**row.get("hparams", {}), **overrides}
    return {
        **row,
        "key": job_key(row["dataset"], row["model"], row["cls"], row["seed"], hparams),
        "hparams": hparams,
        "metrics": evaluate_scores(test, splits.test_labels, threshold, splits.protocol),
        "rescored_from": row["key"],
        "finished": time.time(),
    }


def print_runs(run_dirs: list[Path], overrides: dict) -> None:
    from sklearn.metrics import roc_auc_score

    from training.runs import read_run_info, score_array

    for run_dir in run_dirs:
        cfg = read_run_info(run_dir).config
        splits = job_splits(cfg["dataset"], cfg["protocol"], cfg["normal_class"], cfg["seed"])
        model, net = rescored(run_dir, splits, overrides)
        auroc = [
            roc_auc_score(splits.test_labels, score_array(m, splits.test)[0]) for m in (net, model)
        ]
        print(f"{run_dir}: as recorded {auroc[0]:.4f}, with the overrides {auroc[1]:.4f}")


def main() -> None:
    from training.cli import parse_hparams

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", nargs="+", type=Path, default=None, help="run folders: print only")
    p.add_argument("--plan", nargs="+")
    p.add_argument("--models", nargs="+")
    p.add_argument("--classes", nargs="+", default=None)
    p.add_argument("--tables", nargs="+", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--hparam", action="append", default=[], help="the source rows' variant")
    p.add_argument("--score", action="append", default=[], required=True, help="KEY=VALUE")
    args = p.parse_args()
    args.hparams = parse_hparams(args.hparam)
    overrides = parse_hparams(args.score)
    if args.run:
        print_runs(args.run, overrides)
        return
    if not (args.plan and args.models):
        p.error("--plan and --models are required without --run")
    rows = {json.loads(x)["key"]: json.loads(x) for x in RESULTS.read_text().splitlines() if x}
    for job in plan_jobs(args):
        source = rows.get(job["key"])
        if source is None or "run_dir" not in source:
            print(f"skip {job['key']}: no finished GAN row", flush=True)
            continue
        target = job_key(
            job["dataset"], job["model"], job["cls"], job["seed"], {**args.hparams, **overrides}
        )
        if target in rows:
            print(f"skip {target}: already in {RESULTS.name}", flush=True)
            continue
        if not (ROOT / source["run_dir"] / RUN_FILE).is_file():
            # Trained elsewhere (a GPU machine), or a folder of an unfinished earlier run.
            print(f"skip {job['key']}: no finished run in {source['run_dir']} here", flush=True)
            continue
        result = rescore(source, overrides)
        with RESULTS.open("a") as f:
            f.write(json.dumps(result) + "\n")
        rows[target] = result
        print(f"done {target}: auroc={result['metrics']['auroc']:.4f}", flush=True)


if __name__ == "__main__":
    main()
