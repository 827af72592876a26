"""Per-epoch trace: test metrics after every epoch of one training run, beside the
label-free validation metric that checkpoint selection uses.

The training benchmark reports only the selected checkpoint; this shows why a variant
wins or loses (EGBAD on KDD: epochs where G(E(x)) drops an attack mode, then epochs where
reconstructions generalise to the anomalies). Test labels are read for the trace only,
never to select or calibrate anything.

    python benchmarks/epoch_trace.py --plan kdd --model egbad --seeds 0 1 2 --epochs 8
    python benchmarks/epoch_trace.py --plan kdd --model egbad --seeds 0 1 2 --epochs 8 \\
        --hparam lr=5e-5

Each line goes to results/epochs.jsonl (a finished trace is skipped when rerun) and to
standard output."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_benchmark import DATA_ROOT, PLANS, ROOT, job_key  # noqa: E402

RESULTS = HERE / "results" / "epochs.jsonl"


def finished(key: str, epochs: int) -> bool:
    if not RESULTS.exists():
        return False
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return any(r["key"] == key and r["epoch"] == epochs for r in rows)


def trace(plan: str, model: str, cls: str | None, seed: int, epochs: int, hparams: dict) -> None:
    import numpy as np
    import torch

    from training.data import load_splits
    from training.metrics import evaluate_scores
    from training.runs import score_array
    from training.train import TrainConfig, train

    dataset, protocol, _ = PLANS[plan]
    key = f"{job_key(dataset, model, cls, seed, hparams)}/epochs{epochs}"
    if finished(key, epochs):
        print(f"skip {key} (in {RESULTS.name})", flush=True)
        return
    image_size = 32 if dataset in ("mnist", "fashion-mnist", "cifar10") else None
    splits = load_splits(dataset, protocol, normal_class=cls, root=DATA_ROOT, image_size=image_size)
    train_x = torch.as_tensor(splits.train, dtype=torch.float32)
    rows: list[dict] = []

    def on_epoch(history_row: dict, net) -> None:
        # Fitted scores (GANomaly's feature-mahalanobis) are fitted on a copy, as the run
        # would fit them had it stopped here; the training model is left untouched.
        scorer = net.scorer().model
        scorer.fit_score(train_x)
        val = score_array(scorer, splits.val)[0]
        test = score_array(scorer, splits.test)[0]
        threshold = float(np.quantile(val, 0.99))
        m = evaluate_scores(test, splits.test_labels, threshold, protocol)
        row = {
            "key": key,
            "epoch": history_row["epoch"],
            "val_selection_metric": history_row["val_selection_metric"],
            **{k: m.get(k) for k in ("auroc", "auprc", "f1", "top20_f1") if k in m},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    out = ROOT / "runs" / "trace" / key.replace("/", "_")
    shutil.rmtree(out, ignore_errors=True)  # a trace needs every epoch: no resume
    cfg = TrainConfig(
        model=model,
        dataset=dataset,
        protocol=protocol,
        normal_class=cls,
        seed=seed,
        out=out,
        data_root=DATA_ROOT,
        image_size=image_size,
        epochs=epochs,
        hparams=hparams,
    )
    train(cfg, splits=splits, progress=False, on_epoch=on_epoch)
    best = min(rows, key=lambda r: r["val_selection_metric"])
    print(f"selected epoch {best['epoch']} (lowest validation metric)", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plan", choices=sorted(PLANS), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--classes", nargs="+", default=[None], help="normal classes (image plans)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    from training.cli import parse_hparams

    hparams = parse_hparams(args.hparam)
    for seed in args.seeds:
        for cls in args.classes:
            trace(args.plan, args.model, cls, seed, args.epochs, hparams)


if __name__ == "__main__":
    main()
