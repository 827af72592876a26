"""Does MMOC-GAN's generator use its mode code on images? A short training on development
digits (the multi-modal protocol's 5-9 split, never the 0-4 report split), printing every
50 updates the losses, Q's accuracy at recovering the code of G's samples, and how much G's
output moves when only the code changes against when only the noise does.

    python benchmarks/mmocgan_modes.py                        # the image defaults
    python benchmarks/mmocgan_modes.py --hparam w_mi=30       # a heavier MI loss
    python benchmarks/mmocgan_modes.py --hparam w_fm=0.0005   # feature matching as a mean

Prints one line per checkpoint; nothing is written. About 2 minutes per 400 updates on the
2-core machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_benchmark import job_splits  # noqa: E402

DEV_SPLIT = "5,6,7,8,9"


def main() -> None:
    import torch

    from training.cli import parse_hparams
    from training.models import build_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--digits", type=int, default=8000, help="training digits drawn from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    splits = job_splits("mnist", "one-class-normal", DEV_SPLIT)
    x = torch.as_tensor(splits.train[: args.digits], dtype=torch.float32)
    model = build_model("mmocgan", splits.input_spec, **parse_hparams(args.hparam))
    model.fit_input_space(x)
    h = model.hparams
    modes, batch = h["modes"], h["batch_size"]
    codes = torch.arange(modes).repeat_interleave(50)

    def probe(mode_codes: list[int]) -> torch.Tensor:
        """G's samples for `mode_codes`, one draw each from the same seeded noise: one
        code at a time gives every code the same noise vector."""
        return model.generate(torch.tensor(mode_codes), torch.Generator().manual_seed(1))

    for step in range(args.steps):
        losses = model.training_step(x[torch.randint(len(x), (batch,))])
        if step % 50 and step != args.steps - 1:
            continue
        model.eval()
        with torch.no_grad():
            fake = model.generate(codes, torch.Generator().manual_seed(0))
            accuracy = (model.mode_of(model.from_model_space(fake)) == codes).float().mean()
            # Per-pixel variance of G's output over the codes (one noise vector) and over
            # the noise (one code).
            over_codes = torch.cat([probe([c]) for c in range(modes)]).var(0).mean()
            over_noise = probe([0] * modes).var(0).mean()
        model.train()
        row = {
            "step": step,
            **{k: round(v, 3) for k, v in losses.items()},
            "q_accuracy": round(float(accuracy), 3),
            "variance_over_codes": round(float(over_codes), 4),
            "variance_over_noise": round(float(over_noise), 4),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
