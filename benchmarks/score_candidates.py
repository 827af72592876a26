"""Development runs for the tabular defaults: train one model per (table, architecture,
seed) and score the selected checkpoint with every candidate score, so candidates are
compared on the same weights. Only the development seeds (5-8) and tables are meant to be
run here; the defaults chosen from them are then benchmarked by `train_benchmark.py --plan
tables` on the report seeds.

    python benchmarks/score_candidates.py --tables gen-local wine --seeds 5 6 7
    python benchmarks/score_candidates.py --tables kdd-normal --archs memgan --hparam epochs=3

One line per (table, architecture, seed, variant) goes to results/candidates.jsonl, with
every candidate's AUROC and F1 at the calibrated threshold; finished lines are skipped."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tables import TABLES, table_splits  # noqa: E402
from train_benchmark import DATA_ROOT, ROOT, variant  # noqa: E402

RESULTS = HERE / "results" / "candidates.jsonl"
CANDIDATES = {
    "ganomaly": ["latent", "reconstruction", "feature-mahalanobis", "knn"],
    "egbad": ["knn", "latent", "fm"],
    "memgan": ["reconstruction", "memory", "knn"],
    "mmocgan": ["discriminator", "knn"],
}


def done() -> set[str]:
    if not RESULTS.exists():
        return set()
    return {json.loads(x)["key"] for x in RESULTS.read_text().splitlines() if x.strip()}


def run(table: str, arch: str, seed: int, hparams: dict) -> dict:
    import numpy as np
    import torch

    from training.metrics import evaluate_scores
    from training.models import build_model
    from training.runs import load_run, score_array
    from training.train import TrainConfig, train

    splits = table_splits(table, seed, DATA_ROOT)
    key = f"{table}/{arch}/seed{seed}" + (f"/{variant(hparams)}" if hparams else "")
    out = ROOT / "runs" / "candidates" / key.replace("/", "_")
    cfg = TrainConfig(
        model=arch,
        dataset=table,
        protocol=splits.protocol,
        seed=seed,
        out=out,
        resume=out.exists(),
        hparams=dict(hparams),
    )
    t0 = time.perf_counter()
    net, info = load_run(train(cfg, splits=splits, progress=False))
    train_x = torch.as_tensor(splits.train)
    scores: dict[str, dict] = {}
    for method in CANDIDATES[arch]:
        model = build_model(arch, splits.input_spec, **{**net.hparams, "score_method": method})
        model.load_state_dict(net.state_dict(), strict=False)
        model.eval()
        model.fit_score(train_x)
        val = score_array(model, splits.val)[0]
        test = score_array(model, splits.test)[0]
        threshold = float(np.quantile(val.astype(np.float64), 0.99))
        m = evaluate_scores(test, splits.test_labels, threshold, splits.protocol)
        scores[method] = {k: m.get(k) for k in ("auroc", "f1", "top20_f1") if m.get(k) is not None}
    return {
        "key": key,
        "table": table,
        "arch": arch,
        "seed": seed,
        "hparams": hparams,
        "selected_epoch": info.selected_epoch,
        "epochs": info.epochs_done,
        "seconds": round(time.perf_counter() - t0, 1),
        "scores": scores,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tables", nargs="+", choices=sorted(TABLES), required=True)
    p.add_argument("--archs", nargs="+", default=list(CANDIDATES))
    p.add_argument("--seeds", nargs="+", type=int, default=[5, 6, 7])
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    from training.cli import parse_hparams

    hparams = parse_hparams(args.hparam)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for table in args.tables:
        for seed in args.seeds:
            for arch in args.archs:
                key = f"{table}/{arch}/seed{seed}" + (f"/{variant(hparams)}" if hparams else "")
                if key in done():
                    continue
                row = run(table, arch, seed, hparams)
                with RESULTS.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                cells = " ".join(f"{m}={v.get('auroc', 0):.3f}" for m, v in row["scores"].items())
                print(
                    f"{key} ({row['seconds']}s, epoch {row['selected_epoch']}): {cells}", flush=True
                )


if __name__ == "__main__":
    main()


def markdown(path: Path = RESULTS) -> str:
    """Mean AUROC of every candidate score per development table, one table per
    architecture (the checkpoint is the same for every candidate of a run)."""
    import numpy as np

    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    tables = [t for t in TABLES if any(r["table"] == t for r in rows)]
    out = [
        "## Development runs for the tabular defaults",
        "",
        f"Generated from `{path.relative_to(HERE.parent)}` by `benchmarks/score_candidates.py` "
        "(commands at the top): each run trains once with the defaults of the time and "
        "scores its selected checkpoint with every candidate score (rows naming a variant "
        "trained with that setting). Cells: mean AUROC over "
        "the development seeds that ran (how many in brackets); the report seeds (0-4) were "
        "not run here.",
        "",
    ]
    for arch, methods in CANDIDATES.items():
        runs = [r for r in rows if r["arch"] == arch]
        if not runs:
            continue
        out += [
            f"### {arch}",
            "",
            "| score | " + " | ".join(tables) + " | mean | worst |",
            "|---" * (len(tables) + 3) + "|",
        ]
        variants = sorted({variant(r["hparams"]) for r in runs})
        for method, var in ((m, v) for v in variants for m in methods):
            sel = [r for r in runs if variant(r["hparams"]) == var]
            means, cells = [], []
            for t in tables:
                vals = [r["scores"][method]["auroc"] for r in sel if r["table"] == t]
                cells.append(f"{np.mean(vals):.3f} ({len(vals)})" if vals else "-")
                if vals:
                    means.append(float(np.mean(vals)))
            summary = f"{np.mean(means):.3f} | {min(means):.3f}" if means else "- | -"
            name = f"`{method}`" + (f" ({var})" if var else "")
            out.append(f"| {name} | " + " | ".join(cells) + f" | {summary} |")
        out.append("")
    return "\n".join(out) + "\n"
