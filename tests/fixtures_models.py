"""Model-repository fixtures for the tests (owned by the service tests).

Real exported ONNX graphs, built once per session from the training package's models with
untrained weights (serving does not care whether a model is good, only that the graph,
manifest and preprocessing are real). Tests that change the repository get a copy."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gansentry.contract import EXPORT_OPSET, MIN_OPSET
from gansentry.manifest import ImageInput, Manifest, TabularInput, TabularPreprocessing
from gansentry.preprocessing import encode_columns, fit_tabular

IMAGE_SPEC = ImageInput(channels=1, height=32, width=32)
IMAGE_MODEL = "digits"
TABULAR_MODEL = "traffic"


def tabular_columns(n: int = 64, seed: int = 0) -> dict[str, list[object]]:
    """Raw training columns: two numeric fields and one symbolic field."""
    rng = np.random.default_rng(seed)
    return {
        "duration": [float(v) for v in rng.exponential(3.0, n)],
        "protocol": [str(v) for v in rng.choice(["tcp", "udp", "icmp"], n)],
        "bytes": [float(v) for v in rng.integers(0, 5000, n)],
    }


def tabular_preprocessing() -> TabularPreprocessing:
    return fit_tabular(tabular_columns(), symbolic=["protocol"], scaling="minmax")


def _scorer(arch: str, spec: ImageInput | TabularInput, seed: int):
    import torch

    from training.models import build_model

    torch.manual_seed(seed)
    model = build_model(arch, spec)
    # As training does after selection: scores that need the normals (EGBAD's nearest code
    # on tables) are fitted on them.
    model.fit_score(torch.rand(64, *spec.shape, generator=torch.Generator().manual_seed(seed)))
    return model.scorer()


def export_model(
    models_dir: Path,
    name: str,
    arch: str,
    spec: ImageInput | TabularInput,
    sample: np.ndarray,
    seed: int = 0,
) -> Manifest:
    """Export an untrained `arch` for `spec` and publish it as the next version of `name`,
    with its threshold at the median score of `sample` (so both outcomes occur)."""
    import torch

    from training.onnx_export import export_onnx, publish

    scorer = _scorer(arch, spec, seed).eval()
    batch = torch.from_numpy(sample.astype(np.float32))
    onnx_path = models_dir / f".{name}-{seed}.onnx"
    rel = export_onnx(scorer, batch, onnx_path)
    with torch.no_grad():
        scores = scorer(batch)[0].numpy()
    threshold = float(np.median(scores))
    manifest = publish(
        models_dir,
        name,
        onnx_path,
        {
            "architecture": arch,
            "input": spec,
            "threshold": {
                "value": threshold,
                "rule": f"median of {len(scores)} test-fixture scores",
                "quantile": 0.5,
                "calibration_size": len(scores),
            },
            "provenance": {
                "dataset": "fixture",
                "protocol": "untrained",
                "epochs": 0,
                "seed": seed,
            },
            "metrics": {"auroc": None},
            "onnx": {"opset": EXPORT_OPSET, "parity_max_rel_diff": rel},
        },
    )
    onnx_path.unlink()
    return manifest


def image_sample(n: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *IMAGE_SPEC.shape), dtype=np.float32)


def tabular_spec() -> TabularInput:
    prep = tabular_preprocessing()
    return TabularInput(
        num_features=prep.num_features,
        feature_names=prep.feature_names(),
        preprocessing=prep,
    )


@dataclass(frozen=True)
class ModelRepo:
    root: Path
    image_model: str = IMAGE_MODEL
    tabular_model: str = TABULAR_MODEL

    def copy_to(self, dest: Path) -> Path:
        shutil.copytree(self.root, dest)
        return dest


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> ModelRepo:
    """digits/1 and digits/2 (GANomaly, 1x32x32 grey), traffic/1 (EGBAD on three raw
    fields, one symbolic)."""
    root = tmp_path_factory.mktemp("models")
    sample = image_sample()
    export_model(root, IMAGE_MODEL, "ganomaly", IMAGE_SPEC, sample, seed=1)
    export_model(root, IMAGE_MODEL, "ganomaly", IMAGE_SPEC, sample, seed=2)
    spec = tabular_spec()
    assert spec.preprocessing is not None
    features = encode_columns(tabular_columns(), spec.preprocessing)
    export_model(root, TABULAR_MODEL, "egbad", spec, features, seed=3)
    return ModelRepo(root)


@pytest.fixture
def mutable_repo(model_repo: ModelRepo, tmp_path: Path) -> ModelRepo:
    """A private copy for tests that add, corrupt or remove versions."""
    return ModelRepo(model_repo.copy_to(tmp_path / "models"))


# ---------------------------------------------------------------- serving helpers


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """uint8 [H, W] (grey) or [H, W, 3] -> encoded image bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def random_pixels(h: int = 28, w: int = 28, seed: int = 0, channels: int = 1) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def add_version(repo_root: Path, name: str, source_version: int, new_version: int) -> Path:
    """Copy an existing version under a new number, with its manifest renumbered."""
    src = repo_root / name / str(source_version)
    dest = repo_root / name / str(new_version)
    shutil.copytree(src, dest)
    Manifest.load(dest).model_copy(update={"version": new_version}).save(dest)
    return dest


@asynccontextmanager
async def serving(repo_root: Path, **settings: object) -> AsyncIterator[ServedApp]:
    """The real app with its lifespan (registry, batcher) and an in-process HTTP client."""
    import httpx

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(models_dir=repo_root, **settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gansentry", timeout=60
        ) as client:
            yield ServedApp(app, client)


@dataclass
class ServedApp:
    app: Any
    client: Any

    @property
    def registry(self) -> Any:
        return self.app.state.registry

    @property
    def batcher(self) -> Any:
        return self.app.state.batcher


def metric(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def publish_graph(
    models_dir: Path, name: str, graph: Any, features: int, threshold: float, rule: str, seed: int
) -> Path:
    """Save a hand-built tabular ONNX graph (`onnx.helper`, no torch) as `name` version 1
    with a manifest, for tests that need a graph with a given behaviour."""
    import onnx
    from onnx import helper

    from gansentry.manifest import OnnxInfo, sha256_file

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    directory = models_dir / name / "1"
    directory.mkdir(parents=True)
    onnx.save(model, directory / "model.onnx")
    Manifest(
        name=name,
        version=1,
        architecture="ganomaly",
        input=TabularInput(num_features=features, feature_names=[f"f{i}" for i in range(features)]),
        threshold={"value": threshold, "rule": rule},
        provenance={
            "dataset": "fixture",
            "protocol": "hand-built graph",
            "epochs": 0,
            "seed": seed,
        },
        onnx=OnnxInfo(sha256=sha256_file(directory / "model.onnx"), opset=MIN_OPSET),
    ).save(directory)
    return directory
