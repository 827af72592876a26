"""Development runs for the image defaults of EGBAD and MEMGAN: train one model per
(architecture, MNIST normal class, seed) and score it with every candidate score, after
every epoch (on a fixed 2,000-digit subset of the test split) and on the selected
checkpoint (on the whole test split), so candidates are compared on the same weights.
Only development classes and seeds are meant to be run here (digits 1 and 7, seed 5);
digit 0, the shipped models' class, is a report class and is never run through this.

    python benchmarks/image_candidates.py --archs egbad memgan --classes 1 7 --seeds 5
    python benchmarks/image_candidates.py --archs memgan --classes 1 --hparam epochs=10

For the selected checkpoint it also reports F1 at several validation-normal quantiles, the
threshold rules a user could pick (MNIST one-class-normal test sets are 90% anomalies).
One line per run goes to results/image_candidates.jsonl; finished lines are skipped."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_benchmark import ROOT, gan_config, job_key, job_splits  # noqa: E402

RESULTS = HERE / "results" / "image_candidates.jsonl"
# name -> hparam overrides of the trained run's: "rec" is EGBAD's score without its
# discriminator term, the plain L1 reconstruction error of G(E(x)).
CANDIDATES: dict[str, dict[str, dict]] = {
    "egbad": {
        "fm": {"score_method": "fm"},
        "cross-e": {"score_method": "cross-e"},
        "rec": {"score_method": "fm", "score_weight": 0.0},
        "latent": {"score_method": "latent"},
        "knn": {"score_method": "knn"},
    },
    # f-AnoGAN: the paper's izi_f score, its pixel residual alone (kappa 0) and the nearest
    # training code.
    "fanogan": {
        "izi_f": {"score_method": "izi_f"},
        "rec": {"score_method": "izi_f", "kappa": 0.0},
        "knn": {"score_method": "knn"},
    },
    # MMOC-GAN: the paper's discriminator probability and the nearest training normal in
    # the discriminator's features: in their first 64 principal axes against every
    # training normal, whole against every normal, and whole against 2,048; and the
    # default, the distance ratio to the 20 nearest in the 64 axes (`knn_relative`).
    "mmocgan": {
        "discriminator": {"score_method": "discriminator"},
        "knn": {"score_method": "knn", "knn_relative": 0},
        "knn-whole": {"score_method": "knn", "knn_components": 0, "knn_relative": 0},
        "knn-whole-2048": {
            "score_method": "knn",
            "knn_components": 0,
            "knn_max_reference": 2048,
            "knn_relative": 0,
        },
        "knn-relative": {"score_method": "knn", "knn_relative": 20},
    },
    "memgan": {
        "reconstruction": {"score_method": "reconstruction"},
        "memory": {"score_method": "memory"},
        "knn": {"score_method": "knn"},
    },
}
QUANTILES = (0.8, 0.9, 0.95, 0.99)
TRACE_TEST = 2_000


def done() -> set[str]:
    if not RESULTS.exists():
        return set()
    return {json.loads(x)["key"] for x in RESULTS.read_text().splitlines() if x.strip()}


def candidate_scores(net, arch: str, splits, train_x, test_x) -> dict[str, tuple]:
    """-> {candidate: (validation scores, test scores)} for the weights of `net`."""
    from training.models import build_model
    from training.runs import score_array

    out = {}
    for name, overrides in CANDIDATES[arch].items():
        model = build_model(arch, splits.input_spec, **{**net.hparams, **overrides})
        model.load_state_dict(net.state_dict(), strict=False)
        model.eval()
        model.fit_score(train_x)
        out[name] = (score_array(model, splits.val)[0], score_array(model, test_x)[0])
    return out


def pixel_knn(splits, test_x) -> tuple:
    """The nearest training image in pixel space (the benchmark's `knn` baseline)."""
    import numpy as np
    from sklearn.neighbors import NearestNeighbors

    flat = lambda a: np.asarray(a).reshape(len(a), -1)  # noqa: E731
    nn = NearestNeighbors(n_neighbors=1).fit(np.unique(flat(splits.train), axis=0))
    return tuple(nn.kneighbors(flat(a))[0][:, 0] for a in (splits.val, test_x))


def run(arch: str, cls: str, seed: int, hparams: dict) -> dict:
    import numpy as np
    import torch

    from training.metrics import evaluate_scores
    from training.runs import load_run
    from training.train import train

    key = job_key("mnist", arch, cls, seed, hparams)
    splits = job_splits("mnist", "one-class-normal", cls)
    train_x = torch.as_tensor(splits.train, dtype=torch.float32)
    rng = np.random.default_rng(0)
    sub = np.sort(rng.choice(len(splits.test), min(TRACE_TEST, len(splits.test)), replace=False))
    trace: list[dict] = []

    def auroc(scores: dict, labels) -> dict:
        return {
            name: round(evaluate_scores(t, labels, float(np.quantile(v, 0.99)), None)["auroc"], 4)
            for name, (v, t) in scores.items()
        }

    def on_epoch(row: dict, net) -> None:
        scores = candidate_scores(net, arch, splits, train_x, splits.test[sub])
        trace.append(
            {
                "epoch": row["epoch"],
                "val_selection_metric": row["val_selection_metric"],
                "auroc": auroc(scores, splits.test_labels[sub]),
            }
        )
        print(json.dumps(trace[-1]), flush=True)

    out = ROOT / "runs" / "image-candidates" / key.replace("/", "_")
    spec = {"model": arch, "dataset": "mnist", "protocol": "one-class-normal", "cls": cls}
    cfg = gan_config({**spec, "seed": seed, "hparams": hparams}, out, resume=out.exists())
    t0 = time.perf_counter()
    net, info = load_run(train(cfg, splits=splits, progress=False, on_epoch=on_epoch))
    scores = candidate_scores(net, arch, splits, train_x, splits.test)
    scores["pixel-knn"] = pixel_knn(splits, splits.test)
    selected = {}
    for name, (val, test) in scores.items():
        cell = {}
        for q in QUANTILES:
            m = evaluate_scores(test, splits.test_labels, float(np.quantile(val, q)), None)
            cell["auroc"] = round(m["auroc"], 4)
            cell[f"f1@{q}"] = round(m["f1"], 4)
        selected[name] = cell
    return {
        "key": key,
        "arch": arch,
        "cls": cls,
        "seed": seed,
        "hparams": hparams,
        "selected_epoch": info.selected_epoch,
        "epochs": info.epochs_done,
        "training_seconds": info.training_seconds,
        "seconds": round(time.perf_counter() - t0, 1),
        "trace": trace,
        "selected": selected,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", nargs="+", choices=sorted(CANDIDATES), default=list(CANDIDATES))
    p.add_argument("--classes", nargs="+", default=["1", "7"])
    p.add_argument("--seeds", nargs="+", type=int, default=[5])
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    if "0" in args.classes:
        raise SystemExit("digit 0 is the shipped models' class: a report class, not for tuning")
    from training.cli import parse_hparams

    hparams = parse_hparams(args.hparam)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for cls in args.classes:
            for arch in args.archs:
                key = job_key("mnist", arch, cls, seed, hparams)
                if key in done():
                    continue
                row = run(arch, cls, seed, hparams)
                with RESULTS.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                cells = " ".join(
                    f"{m}={v['auroc']:.3f}/{v['f1@0.99']:.2f}" for m, v in row["selected"].items()
                )
                print(f"{key} (epoch {row['selected_epoch']}): {cells}", flush=True)


if __name__ == "__main__":
    main()


def markdown(path: Path = RESULTS) -> str:
    """Per development run: every candidate's AUROC on the selected checkpoint, its F1 at
    each validation-normal quantile, and the per-epoch AUROC (2,000-digit test subset)."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    out = [
        "## Images: scores on development classes",
        "",
        f"Generated from `{path.relative_to(HERE.parent)}` by `benchmarks/image_candidates.py` "
        "(commands at the top). Development classes: MNIST one-class-normal, normal digit 1 "
        "or 7, training seed 5; digit 0 (the shipped models' class) and the benchmark's "
        "seeds 0-1 were not used to choose anything. Each run trains once with the defaults "
        "of the time and scores the same selected checkpoint with every candidate score; "
        "`pixel-knn` is the distance to the nearest training image (no model). F1 is at the "
        "given quantile of the candidate's validation-normal scores (test sets are 90% "
        "anomalies).",
        "",
        "| run | selected epoch | score | AUROC | "
        + " | ".join(f"F1 @ q{q}" for q in QUANTILES)
        + " |",
        "|---|---|---|---|" + "---|" * len(QUANTILES),
    ]
    for r in rows:
        for name, cell in r["selected"].items():
            f1 = " | ".join(f"{cell[f'f1@{q}']:.3f}" for q in QUANTILES)
            out.append(
                f"| {r['key']} | {r['selected_epoch']} of {r['epochs']} | `{name}` | "
                f"{cell['auroc']:.3f} | {f1} |"
            )
    out += [
        "",
        "Per-epoch AUROC of each candidate (on 2,000 test digits drawn at random; the "
        "selected epoch in bold):",
        "",
        "| run | score | per epoch |",
        "|---|---|---|",
    ]
    for r in rows:
        # A candidate added after a run was made has no trace in it.
        for name in [c for c in CANDIDATES[r["arch"]] if all(c in t["auroc"] for t in r["trace"])]:
            cells = " ".join(
                f"**{t['auroc'][name]:.3f}**"
                if t["epoch"] == r["selected_epoch"]
                else f"{t['auroc'][name]:.3f}"
                for t in r["trace"]
            )
            out.append(f"| {r['key']} | `{name}` | {cells} |")
    return "\n".join(out) + "\n"
