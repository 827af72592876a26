"""The shipped model repository serves the README's quickstart inputs: a real MNIST test
digit and real KDD Cup 99 records, through the real app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gansentry.manifest import Manifest, sha256_file
from tests.fixtures_models import serving

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
EXAMPLES = ROOT / "docs" / "examples"
SHIPPED = sorted(p for p in MODELS.glob("*/*") if (p / "manifest.json").exists())


def test_every_shipped_model_is_valid_and_small():
    assert SHIPPED, "models/ holds no model"
    for version in SHIPPED:
        manifest = Manifest.load(version)
        assert manifest.onnx.sha256 == sha256_file(version / "model.onnx")
        assert manifest.metrics.get("auroc") is not None
    total = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file())
    # Old versions stay beside new ones for clients that pin them; the nearest-code
    # models carry their training normals' codes (mnist-egbad/2: 4.3 MB of them).
    assert total < 40 * 1024 * 1024


@pytest.mark.parametrize(
    "name", sorted({p.parent.name for p in SHIPPED if "mnist" in p.parent.name})
)
async def test_mnist_models_score_a_seven_above_a_zero(name):
    files = [
        ("image", (f.name, f.read_bytes(), "image/png"))
        for f in (EXAMPLES / "mnist-test-0.png", EXAMPLES / "mnist-test-7.png")
    ]
    async with serving(MODELS, providers="cpu") as s:
        r = await s.client.post("/score", params={"model": name}, files=files)
    assert r.status_code == 200, r.text
    zero, seven = r.json()["results"]
    assert zero["score"] < seven["score"]
    assert not zero["is_anomaly"]
    if name == "mnist-ganomaly":  # the README quickstart's model and answer
        assert seven["is_anomaly"]


@pytest.mark.parametrize("name", sorted({p.parent.name for p in SHIPPED if "kdd" in p.parent.name}))
async def test_kdd_models_score_raw_records(name):
    inputs = [
        json.loads((EXAMPLES / f).read_text())
        for f in ("kdd-attack-traffic.json", "kdd-normal-traffic.json")
    ]
    async with serving(MODELS, providers="cpu") as s:
        r = await s.client.post("/score", json={"model": name, "inputs": inputs})
    assert r.status_code == 200, r.text
    attack, normal = r.json()["results"]
    # kdd-dagmm: attacks are the normal class, "normal." traffic the anomaly.
    assert attack["score"] < normal["score"]
