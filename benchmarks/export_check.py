"""Export check for the tabular benchmark: every finished GAN run of the given seeds is
exported to ONNX with the same `export_onnx` that `gansentry export` uses (its parity check
on a real batch included), and its test split is scored by the graph on ONNX Runtime, as
the service would score it.

    python benchmarks/export_check.py --seeds 0

One line per run goes to results/export.jsonl: whether export succeeded (or the
ParityError it raised), its parity figure, and the graph's AUROC and F1 at the run's
calibrated threshold beside PyTorch's from the benchmark row."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_benchmark import GANS, ROOT, job_splits, read_rows  # noqa: E402

RESULTS = HERE / "results" / "export.jsonl"


def check(row: dict) -> dict:
    import numpy as np
    import torch

    from training.evaluate import cpu_session, score_batches
    from training.export import parity_batch
    from training.metrics import evaluate_scores
    from training.onnx_export import ParityError, export_onnx
    from training.runs import load_run

    splits = job_splits(row["dataset"], row["protocol"], row["cls"], row["seed"])
    model, info = load_run(ROOT / row["run_dir"])
    val, test = splits.val.astype(np.float32), splits.test.astype(np.float32)
    out = {"key": row["key"], "table": row["cls"], "model": row["model"], "seed": row["seed"]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            out["parity_max_rel_diff"] = export_onnx(
                model.scorer(), torch.from_numpy(parity_batch(val, test)), path
            )
            out["export"] = "ok"
        except ParityError as e:
            out["export"] = f"ParityError: {e}"
        scores, _ = score_batches(cpu_session(path, tuple(splits.input_spec.shape)), test)
    m = evaluate_scores(scores, splits.test_labels, info.threshold.value, splits.protocol)
    out["graph"] = {"auroc": m["auroc"], "f1": m["f1"]}
    out["pytorch"] = {"auroc": row["metrics"]["auroc"], "f1": row["metrics"]["f1"]}
    return out


def markdown(path: Path = RESULTS) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    out = [
        "### Exporting the benchmark's runs",
        "",
        f"`python benchmarks/export_check.py --seeds 0` -> `{path.relative_to(HERE.parent)}`: "
        "each run exported with `export_onnx` (as `gansentry export`), its test split scored "
        "by the graph on ONNX Runtime.",
        "",
        "| run | export | graph AUROC | PyTorch AUROC | graph F1 | PyTorch F1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, p = r["graph"], r["pytorch"]
        out.append(
            f"| {r['key']} | {r['export']} | {g['auroc']:.4f} | {p['auroc']:.4f} | "
            f"{g['f1']:.3f} | {p['f1']:.3f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = p.parse_args()
    done = set()
    if RESULTS.exists():
        done = {json.loads(x)["key"] for x in RESULTS.read_text().splitlines() if x.strip()}
    for row in read_rows():
        if (
            row["dataset"] != "tables"
            or row["model"] not in GANS
            or row.get("hparams")
            or row["seed"] not in args.seeds
            or row["key"] in done
        ):
            continue
        result = check(row)
        with RESULTS.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
