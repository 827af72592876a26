"""Reloading the model repository while serving, and refusing broken models at start."""

from __future__ import annotations

import json

import numpy as np

from gansentry.contract import MANIFEST_FILE, MODEL_FILE
from tests.fixtures_models import (
    IMAGE_MODEL,
    IMAGE_SPEC,
    TABULAR_MODEL,
    ModelRepo,
    add_version,
    metric,
    serving,
)

ARRAY = np.full(IMAGE_SPEC.shape, 0.25, dtype=np.float32).tolist()


def info(version: str) -> float:
    return metric(
        "gansentry_model_info",
        model=IMAGE_MODEL,
        version=version,
        architecture="ganomaly",
        provider="cpu",
    )


async def score(s, version: int | None = None):  # noqa: ANN001, ANN201
    return await s.client.post(
        "/score", json={"model": IMAGE_MODEL, "version": version, "inputs": [{"array": ARRAY}]}
    )


async def test_reload_serves_a_new_version(mutable_repo: ModelRepo) -> None:
    async with serving(mutable_repo.root) as s:
        assert (await score(s)).json()["version"] == 2
        add_version(mutable_repo.root, IMAGE_MODEL, 1, 3)
        r = await s.client.post("/admin/reload")
        assert r.status_code == 200
        assert r.json() == {
            "loaded": [f"{IMAGE_MODEL}:1", f"{IMAGE_MODEL}:2", f"{IMAGE_MODEL}:3", "traffic:1"],
            "errors": {},
        }
        answer = (await score(s)).json()
        assert answer["version"] == 3
        v1 = (await score(s, 1)).json()
        assert answer["results"][0]["score"] == v1["results"][0]["score"]  # a copy of v1
        assert info("3") == 1.0
        models = (await s.client.get(f"/models/{IMAGE_MODEL}")).json()
        assert models["latest"] == 3


async def test_failed_reload_keeps_the_old_model_serving(mutable_repo: ModelRepo) -> None:
    async with serving(mutable_repo.root) as s:
        before = (await score(s, 2)).json()["results"][0]["score"]
        (mutable_repo.root / IMAGE_MODEL / "2" / MODEL_FILE).write_bytes(b"garbage")
        new = add_version(mutable_repo.root, IMAGE_MODEL, 1, 3)
        (new / MANIFEST_FILE).write_text("{")
        r = await s.client.post("/admin/reload")
        assert r.status_code == 200
        errors = r.json()["errors"]
        assert set(errors) == {f"{IMAGE_MODEL}/2", f"{IMAGE_MODEL}/3"}
        assert errors[f"{IMAGE_MODEL}/2"].startswith("sha256 of model.onnx is")
        assert errors[f"{IMAGE_MODEL}/3"].startswith("invalid manifest.json")
        after = await score(s)
        assert after.status_code == 200
        assert after.json()["version"] == 2, "the broken new version must not be served"
        assert after.json()["results"][0]["score"] == before
        assert (await score(s, 3)).status_code == 404
        refused = (await s.client.get("/models")).json()["refused"]
        assert set(refused) == set(errors)
        assert info("2") == 1.0 and info("3") == 0.0


async def test_removed_version_leaves_the_info_metric(mutable_repo: ModelRepo) -> None:
    import shutil

    async with serving(mutable_repo.root) as s:
        assert info("1") == 1.0
        shutil.rmtree(mutable_repo.root / IMAGE_MODEL / "1")
        assert (await s.client.post("/admin/reload")).json()["errors"] == {}
        assert info("1") == 0.0 and info("2") == 1.0
        assert (await score(s, 1)).status_code == 404


async def test_broken_model_is_refused_at_start_while_others_serve(
    mutable_repo: ModelRepo,
) -> None:
    manifest = mutable_repo.root / TABULAR_MODEL / "1" / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    data["input"]["num_features"] = 99
    manifest.write_text(json.dumps(data))
    async with serving(mutable_repo.root) as s:
        models = (await s.client.get("/models")).json()
        assert [m["name"] for m in models["models"]] == [IMAGE_MODEL]
        assert models["refused"] == {
            f"{TABULAR_MODEL}/1": "invalid manifest.json: input.tabular: "
            "Value error, feature_names must have num_features entries"
        }
        ready = await s.client.get("/readyz")
        assert ready.status_code == 200
        r = await s.client.post(
            "/score", json={"model": TABULAR_MODEL, "inputs": [{"array": [0.0] * 5}]}
        )
        assert r.status_code == 404
        assert (await score(s)).status_code == 200


def test_latest_is_the_highest_version_the_backend_serves(model_repo: ModelRepo) -> None:
    """Through Redis a version the API just loaded is not "latest" until a live worker
    serves it; a pinned version is served as asked; with no version routable, the highest
    loaded one is returned and the backend refuses it with its own message."""
    from service.registry import Registry
    from service.settings import Settings

    settings = Settings(models_dir=model_repo.root, providers="cpu", intra_op_threads=1)
    registry = Registry(model_repo.root, settings).load()
    assert registry.get(IMAGE_MODEL).ref.version == 2
    served = {f"{IMAGE_MODEL}:1"}
    registry.routable = lambda ref: ref.key in served
    assert registry.get(IMAGE_MODEL).ref.version == 1
    # GET /models says so too: "latest" is what an unpinned request gets now.
    from service.api.models import model_info

    info = model_info(IMAGE_MODEL, registry.models[IMAGE_MODEL], registry)
    assert info["latest"] == 1 and [v["version"] for v in info["versions"]] == [1, 2]
    assert registry.get(IMAGE_MODEL, 2).ref.version == 2
    served.add(f"{IMAGE_MODEL}:2")
    assert registry.get(IMAGE_MODEL).ref.version == 2
    served.clear()
    assert registry.get(IMAGE_MODEL).ref.version == 2
