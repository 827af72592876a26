"""A served score equals the offline `gansentry evaluate` score for the same input.

The model is trained and exported with the real CLI on a generated MNIST-format dataset;
the test posts the raw 28x28 test digits as PNG files (the service resizes them to the
model's 32x32 itself) and as arrays, and compares with evaluate's per-sample scores.csv."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gansentry.cli import main
from tests.data_factories import make_mnist
from tests.fixtures_models import serving

TINY_GANOMALY = ["--hparam", "width=8", "--hparam", "latent_dim=16"]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict[str, object], np.ndarray]:
    root = tmp_path_factory.mktemp("parity")
    make_mnist(root / "data", n_train=120, n_test=40)
    run, models = root / "runs" / "m", root / "models"
    common = ["--data-root", str(root / "data")]
    assert (
        main(
            ["train", "--model", "ganomaly", "--dataset", "mnist", "--normal-class", "2"]
            + ["--image-size", "32", "--epochs", "1", "--out", str(run), "--no-progress"]
            + common
            + TINY_GANOMALY
        )
        == 0
    )
    assert main(["export", str(run), "--models-dir", str(models), "--name", "m", *common]) == 0
    report = root / "report"
    assert main(["evaluate", str(models / "m" / "1"), "--report-dir", str(report), *common]) == 0
    with open(report / "scores.csv") as f:
        offline = {int(r["index"]): float(r["score"]) for r in csv.DictReader(f)}
    raw = gzip.decompress((root / "data" / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    digits = np.frombuffer(raw[16:], np.uint8).reshape(-1, 28, 28)
    manifest = json.loads((models / "m" / "1" / "manifest.json").read_text())
    return models, {"offline": offline, "manifest": manifest}, digits


async def test_served_png_scores_equal_offline_evaluate(exported):
    models, info, digits = exported
    offline: dict[int, float] = info["offline"]  # type: ignore[assignment]
    assert len(offline) == len(digits)
    files = [("image", (f"{i}.png", _png(d), "image/png")) for i, d in enumerate(digits[:16])]
    async with serving(models, providers="cpu", max_batch_delay_ms=5) as s:
        r = await s.client.post("/score", params={"model": "m"}, files=files)
        assert r.status_code == 200, r.text
        served = [res["score"] for res in r.json()["results"]]
    expected = [offline[i] for i in range(16)]
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-7)
    threshold = info["manifest"]["threshold"]["value"]  # type: ignore[index]
    assert r.json()["threshold"] == pytest.approx(threshold)


async def test_served_array_scores_equal_offline_evaluate(exported):
    from gansentry.manifest import ImageInput
    from gansentry.preprocessing import uint8_batch_to_array

    models, info, digits = exported
    offline: dict[int, float] = info["offline"]  # type: ignore[assignment]
    arrays = uint8_batch_to_array(digits[16:24], ImageInput(channels=1, height=32, width=32))
    body = {"model": "m", "inputs": [{"array": a.tolist()} for a in arrays]}
    async with serving(models, providers="cpu") as s:
        r = await s.client.post("/score", json=body)
        assert r.status_code == 200, r.text
    served = [res["score"] for res in r.json()["results"]]
    np.testing.assert_allclose(served, [offline[i] for i in range(16, 24)], rtol=1e-5, atol=1e-7)
