"""End to end through the console commands on tiny generated datasets: train, evaluate the
run (PyTorch), export twice (versions 1 and 2), then check the model repository contract:
the manifest validates, sha256 matches, ONNX Runtime agrees with PyTorch on real inputs,
and evaluating the exported folder (ONNX Runtime, as the service runs it) reproduces the
run's metrics and the manifest's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gansentry.cli import main
from gansentry.contract import INPUT_NAME, MODEL_FILE, SCORE_NAME
from gansentry.manifest import ImageInput, Manifest, TabularInput, sha256_file
from tests.data_factories import make_kdd, make_mnist
from training.evaluate import run_request

TINY_MEMGAN = ["--hparam", "width=8", "--hparam", "latent_dim=8", "--hparam", "memory_units=10"]


def cli(capsys, *argv: str) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def cli_json(capsys, *argv: str) -> dict:
    return json.loads(cli(capsys, *argv, "--json"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    make_kdd(root / "data" / "kddcup99" / "kddcup.data_10_percent.gz", n=600)
    make_mnist(root / "data", n_train=200, n_test=100)
    return root


@pytest.fixture(scope="module")
def kdd_run(work) -> Path:
    run = work / "runs" / "kdd"
    code = main(
        ["train", "--model", "egbad", "--dataset", "kddcup99", "--data-root", str(work / "data")]
        + ["--epochs", "2", "--out", str(run), "--no-progress"]
    )
    assert code == 0
    return run


@pytest.fixture(scope="module")
def mnist_run(work) -> Path:
    run = work / "runs" / "mnist"
    code = main(
        ["train", "--model", "memgan", "--dataset", "mnist", "--normal-class", "3"]
        + ["--data-root", str(work / "data"), "--image-size", "16", "--epochs", "1"]
        + ["--out", str(run), "--no-progress", *TINY_MEMGAN]
    )
    assert code == 0
    return run


def torch_and_onnx_scores(run: Path, onnx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    from training.runs import load_run, score_array

    model, info = load_run(run)
    test = np.asarray(run_request(info).load().test, dtype=np.float32)
    pt, _ = score_array(model, test)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (ox,) = session.run([SCORE_NAME], {INPUT_NAME: test})
    return pt, ox


def test_kdd_train_evaluate_export_twice(capsys, work, kdd_run):
    data = work / "data"
    report = work / "kdd-report"
    run_eval = cli_json(capsys, "evaluate", kdd_run, "--report-dir", report)
    m = run_eval["metrics"]
    assert run_eval["kind"] == "run" and run_eval["protocol"] == "kdd-dagmm"
    assert m["anomaly_fraction"] == pytest.approx(0.2, abs=0.01)
    # The protocol's rule flags the top 20% of test scores.
    assert m["top20_flagged_fraction"] == pytest.approx(0.2, abs=0.02)
    for key in ("auroc", "auprc", "precision", "recall", "f1", "top20_f1"):
        assert 0.0 <= m[key] <= 1.0
    names = {Path(f).name for f in run_eval["files"]}
    pictures = {"roc.png", "score_histogram.png", "reconstructions.png", "per_class_errors.png"}
    assert names == pictures | {"scores.csv"}
    # The per-class breakdown adds up to the protocol's confusion counts.
    rows = run_eval["per_class"]
    assert {r["class"] for r in rows if r["anomalous"]} == {"normal"}
    n_anom = round(m["anomaly_fraction"] * m["n_test"])
    flagged = sum(round(r["flagged"]["top20"] * r["n"]) for r in rows)
    assert flagged == round(m["top20_flagged_fraction"] * m["n_test"])
    tp = round(m["top20_recall"] * n_anom)
    assert sum(r["errors"]["top20"] for r in rows if not r["anomalous"]) == flagged - tp
    assert sum(r["errors"]["top20"] for r in rows if r["anomalous"]) == n_anom - tp
    assert all((report / n).stat().st_size > 1000 for n in pictures)
    assert len((report / "scores.csv").read_text().splitlines()) == 1 + m["n_test"]
    assert json.loads((report / "metrics.json").read_text())["metrics"] == m

    models = work / "models"
    paths = []
    for expected in (1, 2):
        out = cli(capsys, "export", kdd_run, "--models-dir", models, "--name", "kdd-egbad")
        paths.append(Path(out.strip()))
        assert paths[-1] == models / "kdd-egbad" / str(expected)
    for version, path in enumerate(paths, start=1):
        manifest = Manifest.load(path)
        assert (manifest.name, manifest.version, manifest.architecture) == (
            "kdd-egbad",
            version,
            "egbad",
        )
        assert manifest.onnx.sha256 == sha256_file(path / MODEL_FILE)
        assert manifest.onnx.opset >= 17
        assert manifest.onnx.parity_max_rel_diff <= 1e-4
        assert isinstance(manifest.input, TabularInput)
        assert manifest.input.num_features == 121 and manifest.input.preprocessing is not None
        assert manifest.provenance.dataset == "kddcup99"
        assert manifest.provenance.protocol == "kdd-dagmm"
        assert manifest.provenance.anomalous_classes == ["normal"]
        assert manifest.provenance.epochs == 2
        assert manifest.provenance.hyperparameters["split_seed"] == 42
        assert manifest.threshold.rule.startswith("99th percentile of")

    pt, ox = torch_and_onnx_scores(kdd_run, paths[0] / MODEL_FILE)
    assert np.max(np.abs(pt - ox)) <= 1e-4 * np.max(np.abs(pt))

    model_eval = cli_json(
        capsys, "evaluate", paths[1], "--data-root", data, "--report-dir", work / "r2"
    )
    assert model_eval["kind"] == "model"
    assert model_eval["metrics"]["auroc"] == pytest.approx(m["auroc"], abs=1e-4)
    assert model_eval["metrics"]["top20_f1"] == pytest.approx(m["top20_f1"], abs=1e-3)
    # The manifest's metrics were measured with the same served graph and session code.
    assert Manifest.load(paths[1]).metrics == model_eval["metrics"]


def test_memgan_images_report_memory_units_and_export(capsys, work, mnist_run):
    run_eval = cli_json(capsys, "evaluate", mnist_run)
    files = {Path(f).name for f in run_eval["files"]}
    assert "memory_units.png" in files and "reconstructions.png" in files
    assert "anomaly_maps.png" in files, "image reports show input, reconstruction and map"
    assert (mnist_run / "report" / "memory_units.png").stat().st_size > 1000
    assert run_eval["normal_classes"] == ["3"] and len(run_eval["anomalous_classes"]) == 9
    assert run_eval["metrics"]["n_test"] == 100

    out = cli(capsys, "export", mnist_run, "--models-dir", work / "models", "--name", "mnist-mm")
    path = Path(out.strip())
    manifest = Manifest.load(path)
    assert manifest.input == ImageInput(channels=1, height=16, width=16)
    assert manifest.provenance.normal_classes == ["3"]
    assert manifest.architecture == "memgan"
    # Image models are exported with the anomaly map, its colour scale from validation normals.
    assert manifest.outputs == ["score", "reconstruction", "anomaly_map"]
    assert manifest.anomaly_map is not None and manifest.anomaly_map.vmax > 0
    session = ort.InferenceSession(str(path / MODEL_FILE), providers=["CPUExecutionProvider"])
    (amap,) = session.run(["anomaly_map"], {INPUT_NAME: np.zeros((2, 1, 16, 16), np.float32)})
    assert amap.shape == (2, 16, 16)

    pt, ox = torch_and_onnx_scores(mnist_run, path / MODEL_FILE)
    assert np.max(np.abs(pt - ox)) <= 1e-4 * np.max(np.abs(pt))

    model_eval = cli_json(
        capsys, "evaluate", path, "--data-root", work / "data", "--report-dir", work / "r3"
    )
    assert model_eval["metrics"]["auroc"] == pytest.approx(run_eval["metrics"]["auroc"], abs=1e-4)
    assert model_eval["normal_classes"] == ["3"]
    assert (work / "r3" / "anomaly_maps.png").stat().st_size > 1000
    # Overriding the class re-splits the same data: digit 5 becomes the normal class.
    other = cli_json(
        capsys,
        "evaluate",
        path,
        "--data-root",
        work / "data",
        "--normal-class",
        "5",
        "--report-dir",
        work / "r4",
    )
    assert other["normal_classes"] == ["5"]


def test_fitted_feature_score_with_contrast_norm_survives_export(capsys, work):
    """The CIFAR-10 recipe: its input scaling is fitted before training and its score after
    checkpoint selection; both must reach the checkpoint, the ONNX graph and the manifest's
    metrics."""
    import torch

    run = work / "runs" / "gcn"
    cli(
        capsys,
        *["train", "--model", "ganomaly", "--dataset", "mnist", "--normal-class", "3"],
        *["--data-root", work / "data", "--image-size", "16", "--epochs", "1", "--out", run],
        *["--no-progress", "--hparam", "width=8", "--hparam", "latent_dim=8"],
        *["--hparam", "contrast_norm=true", "--hparam", "score_method=feature-mahalanobis"],
    )
    state = torch.load(run / "checkpoints" / "selected.pt", weights_only=True)["model"]
    assert state["gcn_high"] > state["gcn_low"]
    assert not torch.equal(state["feature_whitening"], torch.eye(len(state["feature_mean"])))
    assert state["stats_mean"].shape == (2,)  # one channel mean, then the log contrast

    out = cli(capsys, "export", run, "--models-dir", work / "models", "--name", "mnist-gcn")
    path = Path(out.strip())
    pt, ox = torch_and_onnx_scores(run, path / MODEL_FILE)
    assert np.max(np.abs(pt - ox)) <= 1e-4 * np.max(np.abs(pt))
    run_eval = cli_json(capsys, "evaluate", run, "--report-dir", work / "r5")
    model_eval = cli_json(
        capsys, "evaluate", path, "--data-root", work / "data", "--report-dir", work / "r6"
    )
    assert model_eval["metrics"]["auroc"] == pytest.approx(run_eval["metrics"]["auroc"], abs=1e-4)


def test_unfinished_run_is_refused(capsys, work, kdd_run):
    partial = work / "runs" / "partial"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text((kdd_run / "config.json").read_text())
    for argv in (
        ["export", partial, "--name", "x", "--models-dir", work / "m"],
        ["evaluate", partial],
    ):
        code = main([str(a) for a in argv])
        _, err = capsys.readouterr()
        assert code == 2
        assert len(err.strip().splitlines()) == 1 and "not a finished run" in err
    assert not (work / "m").exists()


def test_corrupt_checkpoint_is_one_error_line(capsys, work, kdd_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(kdd_run, broken)
    (broken / "checkpoints" / "selected.pt").write_bytes(b"not a checkpoint")
    code = main(["evaluate", str(broken)])
    _, err = capsys.readouterr()
    assert code == 2 and "selected.pt" in err and len(err.strip().splitlines()) == 1


def test_model_refuses_data_with_other_features(capsys, work, kdd_run, tmp_path):
    from tests.data_factories import make_csv

    out = cli(capsys, "export", kdd_run, "--models-dir", tmp_path / "models", "--name", "k")
    table = make_csv(tmp_path / "table.csv")
    argv = ["evaluate", out.strip(), "--dataset", str(table), "--protocol", "custom"]
    code = main(argv + ["--report-dir", str(tmp_path / "r")])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1
    # The model's symbolic columns travel with it, so the table is refused by name.
    assert "table.csv" in err and "'protocol_type'" in err, err
    assert not (tmp_path / "r").exists()


def test_check_compatible_names_shape_and_feature():
    from training.evaluate import EvaluationError, check_compatible

    model = TabularInput(num_features=3, feature_names=["a", "b", "c"])
    with pytest.raises(EvaluationError, match=r"shape \[2\], the model expects \[3\]"):
        check_compatible(model, TabularInput(num_features=2, feature_names=["a", "b"]), "t")
    swapped = TabularInput(num_features=3, feature_names=["a", "c", "b"])
    with pytest.raises(EvaluationError, match="feature 1 is 'c', the model expects 'b'"):
        check_compatible(model, swapped, "t")
    image = ImageInput(channels=1, height=16, width=16)
    with pytest.raises(EvaluationError, match=r"\[3, 16, 16\]"):
        check_compatible(image, ImageInput(channels=3, height=16, width=16), "t")
    check_compatible(model, model, "t")
