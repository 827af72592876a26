"""Adding a model is one file: an architecture registered here, in the test, with no change
to the training, export or service code, trains through the real training loop, exports
through the real export, and is served by a running `gansentry serve` after `POST
/admin/reload`. It does not reconstruct its input, so its graph has only `score`, and the
service says so when asked for reconstructions or maps. Also the manifest's open
`architecture` field and the contract's optional reconstruction."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from gansentry.contract import ContractError, check_io
from gansentry.manifest import Manifest, ModelFolderError, TabularInput, load_verified
from tests.fixtures_models import IMAGE_SPEC, ModelRepo
from tests.fixtures_redis import ApiProcess
from training.data.result import Splits
from training.models import ARCHITECTURES, architectures, build_model
from training.models.base import AnomalyGAN, InputSpec
from training.models.registry import Hparams, register, unregister

ARCH = "centre-distance-test"
NAME = "centre-model"


class CentreDistanceTabular(Hparams):
    batch_size: int = 32
    epochs: int = 1
    latent_dim: int = 4


class CentreDistance(AnomalyGAN):
    """Deep SVDD's idea at its smallest: a linear map trained to send normals to a fixed
    centre; the score is the squared distance from it. No reconstruction, no GAN: the
    point is what the registry, export and service need from a model, nothing more."""

    reconstructs = False
    selection_rule = "lowest mean validation-normal score"

    def __init__(self, spec: InputSpec, **hparams: object):
        super().__init__(spec, dict(hparams))
        self.proj = nn.Linear(spec.num_features, int(hparams["latent_dim"]), bias=False)
        self.register_buffer("centre", torch.ones(int(hparams["latent_dim"])))

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"proj": self._adam(self.proj.parameters())}

    def code(self, x: Tensor) -> Tensor:
        return self.proj(x)

    def score(self, x: Tensor) -> tuple[Tensor, None]:
        return (self.code(x) - self.centre).pow(2).sum(dim=1), None

    def training_step(self, x: Tensor) -> dict[str, float]:
        self.train()
        opt = self.optimizers["proj"]
        opt.zero_grad(set_to_none=True)
        loss = self.score(x)[0].mean()
        loss.backward()
        opt.step()
        return {"distance": loss.item()}


@pytest.fixture(scope="module")
def registered() -> Iterator[str]:
    register(ARCH, tabular=CentreDistanceTabular)(CentreDistance)
    yield ARCH
    unregister(ARCH)


def splits() -> Splits:
    rng = np.random.default_rng(0)
    centre = rng.normal(size=5).astype(np.float32)

    def normal(n: int) -> np.ndarray:
        return (centre + 0.1 * rng.normal(size=(n, 5))).astype(np.float32)

    return Splits(
        train=normal(160),
        val=normal(40),
        test=np.concatenate([normal(20), 3 * rng.normal(size=(20, 5)).astype(np.float32)]),
        test_labels=np.r_[np.zeros(20), np.ones(20)].astype(np.int64),
        input_spec=TabularInput(num_features=5, feature_names=[f"f{i}" for i in range(5)]),
        dataset="gauss",
        protocol="custom",
        normal_classes=["0"],
        anomalous_classes=["1"],
        split_seed=0,
    )


@pytest.fixture(scope="module")
def trained_run(registered: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("new-arch") / "run"
    cfg = TrainConfig(model=registered, dataset="gauss", epochs=1, out=out, device="cpu")
    return Path(train(cfg, splits(), progress=False))


def test_a_registered_model_is_listed_and_built_like_the_shipped_ones(registered: str) -> None:
    assert registered in architectures() and registered not in ARCHITECTURES
    spec = splits().input_spec
    model = build_model(registered, spec, latent_dim=2)
    assert isinstance(model, CentreDistance) and model.arch == registered
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['width'\]"):
        build_model(registered, spec, width=8)
    with pytest.raises(ValueError, match=f"{registered} does not take image input"):
        build_model(registered, IMAGE_SPEC)
    with pytest.raises(ValueError, match="already registered"):
        register(registered, tabular=CentreDistanceTabular)(type("Other", (CentreDistance,), {}))


def test_new_architecture_is_served_after_reload_without_reconstructions(
    trained_run: Path, mutable_repo: ModelRepo, tmp_path: Path
) -> None:
    from training.export import export_run
    from training.runs import load_run, score_array

    api = ApiProcess(mutable_repo.root, tmp_path).wait_up()
    try:
        assert httpx.get(f"{api.url}/models/{NAME}").status_code == 404
        manifest, folder = export_run(trained_run, mutable_repo.root, NAME)
        assert manifest.architecture == ARCH
        assert manifest.outputs == ["score"] and not manifest.has_reconstruction
        assert not manifest.has_anomaly_map

        reload = httpx.post(f"{api.url}/admin/reload", timeout=60)
        assert reload.status_code == 200, reload.text
        info = httpx.get(f"{api.url}/models/{NAME}").json()
        version = info["versions"][0]
        assert version["architecture"] == ARCH and version["outputs"] == ["score"]

        x = splits().test[[0, 25]]
        model, _ = load_run(trained_run)
        expected, recons = score_array(model, x)
        assert recons is None
        body = {"model": NAME, "inputs": [{"array": row.tolist()} for row in x]}
        r = httpx.post(f"{api.url}/score", json=body)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        np.testing.assert_allclose([a["score"] for a in results], expected, rtol=1e-4)
        assert [a["is_anomaly"] for a in results] == list(expected > manifest.threshold.value)
        assert all("reconstruction" not in a for a in results)

        asked = httpx.post(f"{api.url}/score", json={**body, "return_reconstruction": True})
        assert asked.status_code == 422
        assert asked.json()["detail"] == (
            f"model {NAME} version 1 has no reconstructions: its graph outputs only score"
        )
        maps = httpx.post(f"{api.url}/score", json={**body, "return_anomaly_map": True})
        assert maps.status_code == 422 and NAME in maps.json()["detail"]

        meta = httpx.get(f"{api.url}/v2/models/{NAME}").json()
        assert [o["name"] for o in meta["outputs"]] == ["score", "is_anomaly"]
        tensor = {"name": "x", "datatype": "FP32", "shape": [2, 5], "data": x.ravel().tolist()}
        v2 = httpx.post(
            f"{api.url}/v2/models/{NAME}/infer",
            json={"inputs": [tensor], "outputs": [{"name": "reconstruction"}]},
        )
        assert v2.status_code == 422 and "has no reconstructions" in v2.json()["error"]
        # The other models in the same service are untouched.
        assert httpx.get(f"{api.url}/models/{mutable_repo.image_model}").status_code == 200
    finally:
        api.stop()
    assert load_verified(folder).architecture == ARCH


def test_the_batching_policy_never_asks_the_graph_for_a_missing_output(
    trained_run: Path, tmp_path: Path
) -> None:
    """A Redis worker passes each request's wish for reconstructions to the policy as it
    came; the loaded model fetches only what its graph has, and the API refuses the rest."""
    from service.batching import policy
    from service.registry import load_model
    from service.settings import Settings
    from training.export import export_run

    _, folder = export_run(trained_run, tmp_path / "models", NAME)
    loaded = load_model(folder, Settings(providers="cpu"))
    x = splits().test[:3]
    outcome = policy.run(loaded, [policy.Part(x, True, anomaly_map=True)])[0]
    assert outcome.error is None and outcome.recons is None and outcome.maps is None
    assert outcome.scores is not None and outcome.scores.shape == (3,)


def test_manifest_takes_any_architecture_name_but_refuses_a_bad_one(
    model_repo: ModelRepo, tmp_path: Path
) -> None:
    source = model_repo.root / model_repo.tabular_model / "1"
    data = Manifest.load(source).model_dump(mode="json")
    assert Manifest.model_validate({**data, "architecture": "f-anogan_2"}).architecture
    for bad in ("Bad Name", "", "../x", "9lives", "a" * 65):
        with pytest.raises(ValidationError, match="must be a lower-case name"):
            Manifest.model_validate({**data, "architecture": bad})
    folder = tmp_path / "m" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes((source / "model.onnx").read_bytes())
    (folder / "manifest.json").write_text(
        Manifest.model_validate(data).model_dump_json().replace('"egbad"', '"Egbad!"')
    )
    with pytest.raises(ModelFolderError, match="architecture 'Egbad!' must be a lower-case"):
        load_verified(folder)


def test_contract_takes_a_graph_without_reconstruction_but_checks_one_it_has() -> None:
    class Arg:
        def __init__(self, name: str, shape: list, type_: str = "tensor(float)") -> None:
            self.name, self.shape, self.type = name, shape, type_

    x = [Arg("x", ["N", 5])]
    check_io(x, [Arg("score", ["N"])], (5,))
    with pytest.raises(ContractError, match="missing output 'score'"):
        check_io(x, [Arg("reconstruction", ["N", 5])], (5,))
    with pytest.raises(ContractError, match="'reconstruction' has shape"):
        check_io(x, [Arg("score", ["N"]), Arg("reconstruction", ["N", 4])], (5,))
