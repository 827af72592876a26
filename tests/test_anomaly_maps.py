"""Anomaly maps end to end: the graph's map against a numpy computation of the same thing,
the contract and manifest checks, `gansentry add-anomaly-map`, and `/score` answering
maps (PNG and array) for a model that has them and 422 for one that has not.

(The same maps through `/v2` and through Redis: tests/test_v2_protocol.py, on the shipped
models; mixed batches on every backend: tests/test_batching_backends.py.)"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from pydantic import ValidationError

from gansentry.anomaly_map import (
    LUT,
    AnomalyMapError,
    add_to_graph,
    gaussian_kernel,
    heatmap,
    radius,
)
from gansentry.cli import main
from gansentry.contract import ContractError, check_io
from gansentry.manifest import Manifest
from service.registry import load_model
from service.settings import Settings
from tests.data_factories import make_mnist
from tests.fixtures_models import (
    IMAGE_MODEL,
    TABULAR_MODEL,
    ModelRepo,
    b64,
    image_sample,
    png_bytes,
    random_pixels,
    serving,
)
from training.anomaly_maps import publish_with_map

REPO = Path(__file__).resolve().parent.parent
MAPPED = "digits-maps"


def numpy_map(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """The definition, written out: mean |x - recon| over channels, then the Gaussian
    blur with reflect padding (numpy's `reflect`: the edge pixel is not repeated)."""
    residual = np.abs(x.astype(np.float64) - recon.astype(np.float64)).mean(axis=1)
    r = radius()
    kernel = gaussian_kernel().astype(np.float64)
    padded = np.pad(residual, ((0, 0), (r, r), (r, r)), mode="reflect")
    h, w = residual.shape[1:]
    out = np.zeros_like(residual)
    for i in range(2 * r + 1):
        for j in range(2 * r + 1):
            out += kernel[i, j] * padded[:, i : i + h, j : j + w]
    return out


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mapped_repo(model_repo: ModelRepo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture repository plus `digits-maps/1`: digits/2's graph with the map."""
    root = model_repo.copy_to(tmp_path_factory.mktemp("maps") / "models")
    publish_with_map(root / IMAGE_MODEL / "2", image_sample(32, seed=5), root, name=MAPPED)
    return root


def test_the_graphs_map_is_the_numpy_definition_and_scores_do_not_move(model_repo: ModelRepo):
    original = onnx.load(str(model_repo.root / IMAGE_MODEL / "1" / "model.onnx"))
    before, after = session(original), session(add_to_graph(original))
    x = image_sample(6, seed=3)
    score0, recon0 = before.run(["score", "reconstruction"], {"x": x})
    score1, recon1, amap = after.run(["score", "reconstruction", "anomaly_map"], {"x": x})
    np.testing.assert_array_equal(score0, score1)
    np.testing.assert_array_equal(recon0, recon1)
    assert amap.shape == (6, 32, 32) and amap.dtype == np.float32
    np.testing.assert_allclose(amap, numpy_map(x, recon1), rtol=1e-5, atol=1e-6)
    # A pixel-exact reconstruction has an all-zero map; the map is not constant otherwise.
    assert np.ptp(amap[0]) > 0


def test_only_image_graphs_without_a_map_get_one(model_repo: ModelRepo):
    tabular = onnx.load(str(model_repo.root / TABULAR_MODEL / "1" / "model.onnx"))
    with pytest.raises(AnomalyMapError, match="for image models"):
        add_to_graph(tabular)
    image = add_to_graph(onnx.load(str(model_repo.root / IMAGE_MODEL / "1" / "model.onnx")))
    with pytest.raises(AnomalyMapError, match="already has an 'anomaly_map' output"):
        add_to_graph(image)


def test_the_contract_checks_an_anomaly_map_when_there_is_one():
    def arg(name: str, shape: list, type_: str = "tensor(float)") -> SimpleNamespace:
        return SimpleNamespace(name=name, type=type_, shape=shape)

    inputs = [arg("x", ["N", 1, 32, 32])]
    outputs = [arg("score", ["N"]), arg("reconstruction", ["N", 1, 32, 32])]
    check_io(inputs, outputs, (1, 32, 32))
    check_io(inputs, [*outputs, arg("anomaly_map", ["N", 32, 32])], (1, 32, 32))
    bad = {
        "must have rank 3": ["N", 1, 32, 32],
        "has shape": ["N", 32, 16],
        "dynamic batch axis": [4, 32, 32],
    }
    for message, shape in bad.items():
        with pytest.raises(ContractError, match=message):
            check_io(inputs, [*outputs, arg("anomaly_map", shape)], (1, 32, 32))
    with pytest.raises(ContractError, match="must be float32"):
        check_io(
            inputs, [*outputs, arg("anomaly_map", ["N", 32, 32], "tensor(double)")], (1, 32, 32)
        )


def test_manifest_outputs_default_for_old_manifests_and_must_agree(mapped_repo: Path):
    old = Manifest.load(mapped_repo / IMAGE_MODEL / "2")
    assert old.outputs == ["score", "reconstruction"] and not old.has_anomaly_map
    new = Manifest.load(mapped_repo / MAPPED / "1")
    assert new.has_anomaly_map and new.anomaly_map is not None
    assert new.provenance.derived_from.startswith(f"{IMAGE_MODEL}/2:")
    assert new.threshold == old.threshold
    data = new.model_dump(mode="json")
    with pytest.raises(ValidationError, match="needs anomaly_map settings"):
        Manifest.model_validate({**data, "anomaly_map": None})
    # A map is |x - reconstruction|: a model without reconstructions has none.
    with pytest.raises(ValidationError, match="'anomaly_map' output needs a 'reconstruction'"):
        Manifest.model_validate({**data, "outputs": ["score", "anomaly_map"]})
    tabular = Manifest.load(mapped_repo / TABULAR_MODEL / "1").model_dump(mode="json")
    with pytest.raises(ValidationError, match="for image models"):
        Manifest.model_validate(
            {**tabular, "outputs": data["outputs"], "anomaly_map": data["anomaly_map"]}
        )


def test_a_manifest_that_lists_a_map_the_graph_lacks_is_refused(mapped_repo: Path, tmp_path):
    folder = tmp_path / MAPPED / "1"
    shutil.copytree(mapped_repo / MAPPED / "1", folder)
    shutil.copyfile(mapped_repo / IMAGE_MODEL / "2" / "model.onnx", folder / "model.onnx")
    manifest = Manifest.load(folder)
    onnx_info = manifest.onnx.model_copy(
        update={"sha256": Manifest.load(mapped_repo / IMAGE_MODEL / "2").onnx.sha256}
    )
    manifest.model_copy(update={"onnx": onnx_info}).save(folder)
    from service.registry import ModelLoadError

    with pytest.raises(ModelLoadError, match="lists output.*anomaly_map"):
        load_model(folder, Settings(providers="cpu"))


def test_heatmap_scales_zero_to_vmax_over_the_colour_map():
    amap = np.array([[0.0, 0.5], [1.0, 7.0]], np.float32)
    rgb = heatmap(amap, vmax=1.0)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == LUT[0].tolist() and rgb[1, 0].tolist() == LUT[255].tolist()
    assert rgb[1, 1].tolist() == LUT[255].tolist(), "clipped at vmax"
    assert rgb[0, 1].tolist() == LUT[128].tolist()
    # dark to bright: the colour map's luminance rises
    luminance = LUT.astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(luminance) >= 0)


def _png_pixels(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


async def test_score_returns_maps_as_png_and_as_arrays(mapped_repo: Path):
    model = load_model(mapped_repo / MAPPED / "1", Settings(providers="cpu"))
    vmax = model.manifest.anomaly_map.vmax
    x = image_sample(3, seed=9)
    scores, _, want = model.infer(x, reconstruction=False, anomaly_map=True)
    inputs = [{"array": a.tolist()} for a in x]
    async with serving(mapped_repo, providers="cpu") as s:
        r = await s.client.post(
            "/score", json={"model": MAPPED, "inputs": inputs, "return_anomaly_map": True}
        )
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [res["score"] for res in results] == pytest.approx(scores.tolist(), rel=1e-6)
        for res, amap in zip(results, want, strict=True):
            assert "reconstruction" not in res
            assert res["anomaly_map_max"] == pytest.approx(float(amap.max()), rel=1e-6)
            assert np.array_equal(_png_pixels(res["anomaly_map"]), heatmap(amap, vmax))

        r = await s.client.post(
            "/score",
            json={
                "model": MAPPED,
                "inputs": inputs,
                "return_anomaly_map": True,
                "anomaly_map_format": "array",
                "return_reconstruction": True,
            },
        )
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        got = np.array([res["anomaly_map"] for res in results], np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert all(isinstance(res["reconstruction"], list) for res in results)

        # multipart: the same options as query parameters
        png = png_bytes(random_pixels(32, 32, seed=4))
        r = await s.client.post(
            "/score",
            params={"model": MAPPED, "return_anomaly_map": "true"},
            files=[("image", ("a.png", png, "image/png"))],
        )
        assert r.status_code == 200, r.text
        (res,) = r.json()["results"]
        assert _png_pixels(res["anomaly_map"]).shape == (32, 32, 3)
        r = await s.client.post(
            "/score",
            params={"model": MAPPED, "return_anomaly_map": "true", "anomaly_map_format": "svg"},
            files=[("image", ("a.png", png, "image/png"))],
        )
        assert r.status_code == 422 and "anomaly_map_format" in r.text

        # without the flag, no map
        r = await s.client.post("/score", json={"model": MAPPED, "inputs": inputs[:1]})
        assert set(r.json()["results"][0]) == {"score", "is_anomaly"}

        listed = {m["name"]: m for m in (await s.client.get("/models")).json()["models"]}
        assert listed[MAPPED]["versions"][0]["outputs"][-1] == "anomaly_map"
        assert listed[MAPPED]["versions"][0]["anomaly_map"]["vmax"] == vmax
        assert listed[IMAGE_MODEL]["versions"][0]["anomaly_map"] is None


async def test_asking_a_model_without_maps_is_a_422_that_says_how_to_get_them(
    mapped_repo: Path,
):
    png = png_bytes(random_pixels(32, 32, seed=1))
    async with serving(mapped_repo, providers="cpu") as s:
        r = await s.client.post(
            "/score",
            json={
                "model": IMAGE_MODEL,
                "inputs": [{"image": b64(png)}],
                "return_anomaly_map": True,
            },
        )
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert f"model {IMAGE_MODEL} version 2 has no anomaly maps" in detail
        assert "gansentry add-anomaly-map" in detail
        r = await s.client.post(
            "/score",
            params={"model": IMAGE_MODEL, "version": 1, "return_anomaly_map": "true"},
            files={"image": png},
        )
        assert r.status_code == 422 and "has no anomaly maps" in r.text
        record = {"duration": 1.0, "protocol": "tcp", "bytes": 10.0}
        r = await s.client.post(
            "/score",
            json={
                "model": TABULAR_MODEL,
                "inputs": [{"record": record}],
                "return_anomaly_map": True,
            },
        )
        assert r.status_code == 422 and "for image models only" in r.json()["detail"]
        # the same server still answers maps for the model that has them
        r = await s.client.post(
            "/score",
            json={"model": MAPPED, "inputs": [{"image": b64(png)}], "return_anomaly_map": True},
        )
        assert r.status_code == 200 and "anomaly_map" in r.json()["results"][0]


def cli(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_add_anomaly_map_publishes_the_next_version_with_the_same_scores(capsys, tmp_path):
    """The shipped mnist-ganomaly/1 upgraded, its colour scale calibrated on a generated
    MNIST's validation normals (the command rebuilds the split from the manifest)."""
    data = tmp_path / "data"
    make_mnist(data, n_train=300, n_test=60)
    models = tmp_path / "models"
    shutil.copytree(REPO / "models" / "mnist-ganomaly" / "1", models / "mnist-ganomaly" / "1")
    code, out, err = cli(
        capsys, "add-anomaly-map", models / "mnist-ganomaly" / "1", "--data-root", data
    )
    assert code == 0, err
    new_dir = Path(out.strip())
    assert new_dir == models / "mnist-ganomaly" / "2"
    assert "colour scale 0.." in err
    old, new = Manifest.load(models / "mnist-ganomaly" / "1"), Manifest.load(new_dir)
    assert new.version == 2 and new.has_anomaly_map and new.onnx.sha256 != old.onnx.sha256
    assert (new.threshold, new.metrics) == (old.threshold, old.metrics)
    assert new.provenance.derived_from.startswith("mnist-ganomaly/1:")
    assert "validation-normal" in new.anomaly_map.vmax_rule
    settings = Settings(providers="cpu")
    x = image_sample(8, seed=2)
    a = load_model(models / "mnist-ganomaly" / "1", settings).run(x, False)[0]
    b, _, maps = load_model(new_dir, settings).infer(x, False, True)
    np.testing.assert_array_equal(a, b)
    assert maps.shape == (8, 32, 32)

    # bad input: one error line each, exit status 2, nothing published
    refusals = [
        ((new_dir,), "already has anomaly maps"),
        ((tmp_path / "nope" / "1",), "no such model folder"),
        (
            (REPO / "models" / "kdd-egbad" / "1", "--models-dir", models),
            "anomaly maps are for images",
        ),
        ((models / "mnist-ganomaly" / "1", "--data-root", tmp_path / "empty"), "not found"),
    ]
    for args, message in refusals:
        code, out, err = cli(capsys, "add-anomaly-map", *args)
        assert code == 2, (args, err)
        assert out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("gansentry add-anomaly-map: error: ") and message in err
    assert sorted(p.name for p in (models / "mnist-ganomaly").iterdir()) == ["1", "2"]
    assert not (models / "kdd-egbad").exists()


def write_division_model(models_dir: Path) -> Path:
    """A hand-built 1x8x8 image graph at opset 17 whose reconstruction is x / x: NaN
    wherever a pixel is 0, so its anomaly map is NaN there while its score (the mean
    pixel) stays finite. Published as version 1, and with the map as version 2."""
    from onnx import TensorProto, helper

    from gansentry.contract import MIN_OPSET
    from gansentry.manifest import ImageInput, OnnxInfo, sha256_file

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])
    graph = helper.make_graph(
        [
            # opset 17, the oldest the contract allows: ReduceMean's axes are an attribute
            helper.make_node("ReduceMean", ["x"], ["score"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("Div", ["x", "x"], ["reconstruction"]),
        ],
        "division",
        [x],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("reconstruction", TensorProto.FLOAT, ["N", 1, 8, 8]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET)])
    model.ir_version = 8
    folder = models_dir / "division" / "1"
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    Manifest(
        name="division",
        version=1,
        architecture="ganomaly",
        input=ImageInput(channels=1, height=8, width=8),
        threshold={"value": 0.9, "rule": "fixed for the test"},
        provenance={"dataset": "fixture", "protocol": "hand-built graph", "epochs": 0, "seed": 0},
        onnx=OnnxInfo(sha256=sha256_file(folder / "model.onnx"), opset=MIN_OPSET),
    ).save(folder)
    normals = np.full((4, 1, 8, 8), 0.5, np.float32)
    return publish_with_map(folder, normals, models_dir)[1]


async def test_a_map_that_is_not_finite_is_refused_like_a_reconstruction(tmp_path):
    write_division_model(tmp_path)
    fine = np.full((1, 8, 8), 0.5)
    holed = fine.copy()
    holed[0, 3, 3] = 0.0
    inputs = [{"array": fine.tolist()}, {"array": holed.tolist()}]
    async with serving(tmp_path, providers="cpu") as s:
        r = await s.client.post("/score", json={"model": "division", "inputs": inputs})
        assert r.status_code == 200, "the scores are finite"
        r = await s.client.post(
            "/score", json={"model": "division", "inputs": inputs, "return_anomaly_map": True}
        )
        assert r.status_code == 422, r.text
        assert r.json()["errors"] == [
            "inputs[1]: the model's score for this input is not a finite number (NaN or Inf): "
            "its values lie far outside what the model was trained on"
        ]
        r = await s.client.post(
            "/score",
            json={"model": "division", "inputs": inputs[:1], "return_anomaly_map": True},
        )
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["anomaly_map_max"] == pytest.approx(0.5, rel=1e-5)
