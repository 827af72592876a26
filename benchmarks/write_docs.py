"""Render docs/benchmarks.md from the benchmarks' results files, so every number in it
comes from a command in this folder:

    python benchmarks/train_benchmark.py --plan kdd --seeds 0 1 2       # -> results/train.jsonl
    python benchmarks/train_benchmark.py --plan mnist                     # (all models)
    python benchmarks/train_benchmark.py --plan mnist --seeds 1 --models ganomaly iforest ocsvm
    python benchmarks/train_benchmark.py --plan cifar10 --models ganomaly iforest ocsvm
    python benchmarks/train_benchmark.py --plan cifar10 --hparam contrast_norm=true
    python benchmarks/train_benchmark.py --plan cifar10 --models ganomaly \
        --hparam contrast_norm=true --hparam score_method=feature-mahalanobis [--seeds 1]
    python benchmarks/epoch_trace.py --plan kdd --model egbad --seeds 0 1 2 --epochs 8 \
        --hparam lr=5e-5                                                  # -> results/epochs.jsonl
    python benchmarks/epoch_trace.py --plan kdd --model egbad --seeds 0 1 2 --epochs 7 \
        --hparam lr=5e-5 --hparam w_rec=30.0
    python benchmarks/serve_benchmark.py                                  # paper-sized GANomaly
    python benchmarks/serve_benchmark.py --model mnist-ganomaly           # a shipped model
    python benchmarks/redis_benchmark.py --duration 6 --rounds 3          # -> results/redis.json
    python benchmarks/write_docs.py                                       # -> docs/benchmarks.md"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import epoch_trace  # noqa: E402
import redis_benchmark  # noqa: E402
import serve_benchmark  # noqa: E402
import train_benchmark  # noqa: E402

RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"
NOTES = HERE / "notes.md"


def main() -> None:
    commands = "\n".join(line.strip() for line in (__doc__ or "").split("\n\n", 1)[1].splitlines())
    parts = ["# Benchmarks", "", "Reproduce with:", "", "```sh", commands, "```", ""]
    if NOTES.exists():
        parts += [NOTES.read_text().strip(), ""]
    if (RESULTS / "train.jsonl").exists():
        parts.append(train_benchmark.report())
    if epoch_trace.RESULTS.exists():
        parts.append(epoch_trace.markdown())
    serving = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("serve-*.json"))]
    if serving:
        parts.append(serve_benchmark.markdown_all(serving))
    if (RESULTS / "redis.json").exists():
        parts.append(redis_benchmark.markdown(json.loads((RESULTS / "redis.json").read_text())))
    DOC.write_text("\n".join(parts))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
