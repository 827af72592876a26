"""The shipped model repository serves the README's quickstart inputs: a real MNIST test
digit and real KDD Cup 99 records, through the real app."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gansentry.manifest import Manifest, sha256_file
from gansentry.preprocessing import decode_image
from service.registry import load_model
from service.settings import Settings
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
    # models carry their training normals' codes (mnist-egbad/2: 4.3 MB of them), and the
    # MNIST models with anomaly maps are whole copies of the versions they derive from.
    # MMOC-GAN's nearest-code reference is its discriminator's 128 features per distinct
    # training row (kdd-mmocgan: 17 MB; mnist04-mmocgan: 8 MB a version, 64 numbers per
    # training digit). Ten models in up to four versions: 120 MiB.
    assert total < 120 * 1024 * 1024


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


DERIVED = sorted(p for p in SHIPPED if Manifest.load(p).provenance.derived_from)


def test_the_mnist_models_have_anomaly_maps_in_their_latest_version():
    latest = {}
    for p in SHIPPED:
        latest[p.parent.name] = max(latest.get(p.parent.name, 0), int(p.name))
    for name, version in latest.items():
        manifest = Manifest.load(MODELS / name / str(version))
        # Every image model that reconstructs (MMOC-GAN does not: no residual to map).
        assert manifest.has_anomaly_map == ("mnist" in name and manifest.has_reconstruction)
    assert [f"{p.parent.name}/{p.name}" for p in DERIVED] == [
        "mnist-egbad/3",
        "mnist-ganomaly/2",
        "mnist-memgan/3",
    ]


@pytest.mark.parametrize("version_dir", DERIVED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_version_with_maps_serves_the_scores_of_the_one_it_derives_from(version_dir):
    """The map is appended to the graph; the score nodes are the same, so every score is
    bit for bit the old version's (checked offline on the 10,592 MNIST test and validation
    images; here on the README's digits and random images)."""
    new = Manifest.load(version_dir)
    source = new.provenance.derived_from.split(":", 1)[0]
    old_dir = MODELS / source
    old = Manifest.load(old_dir)
    assert old.name == new.name and not old.has_anomaly_map
    assert (old.threshold, old.metrics, old.input) == (new.threshold, new.metrics, new.input)
    digits = [
        decode_image((EXAMPLES / f"mnist-test-{d}.png").read_bytes(), new.input) for d in (0, 7)
    ]
    x = np.concatenate(
        [np.stack(digits), np.random.default_rng(0).random((30, 1, 32, 32), np.float32)]
    )
    settings = Settings(providers="cpu", intra_op_threads=1)
    a, b = load_model(old_dir, settings), load_model(version_dir, settings)
    old_scores = a.run(x, reconstruction=False)[0]
    new_scores, _, maps = b.infer(x, reconstruction=False, anomaly_map=True)
    np.testing.assert_array_equal(old_scores, new_scores)
    assert maps is not None and maps.shape == (len(x), 32, 32)
    # The 7 lights up more than the 0 on the model's colour scale.
    assert maps[1].max() > maps[0].max()
