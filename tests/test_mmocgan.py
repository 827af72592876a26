"""MMOC-GAN beyond what the generic model tests check: after a short real training on a
well-separated multi-modal table, D's probability of not-normal ranks far-away rows above
the normals and Q tells G's modes apart; the target density marks the normals as its
high-density region; the exported graph has only `score`, matches PyTorch and is served
(embedded and through Redis), which refuses reconstructions; a resumed run is identical
to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.metrics import roc_auc_score

from gansentry.contract import INPUT_NAME
from gansentry.manifest import ImageInput, TabularInput
from tests.fixtures_redis import RedisServer
from training.data.result import Splits
from training.models import build_model
from training.runs import CHECKPOINT_DIR, LAST_CHECKPOINT, load_run, score_array
from training.train import TrainConfig, train

FEATURES, MODES = 6, 3
NAME = "mmoc"
# Small networks and a short schedule: the architecture is the default's.
# The paper's score, D's probability (tables default to the nearest code, which the
# generic tests in test_nearest_code.py run for every architecture).
HPARAMS = {
    "score_method": "discriminator",
    "modes": MODES,
    "latent_dim": 8,
    "d_hidden": [32, 32],
    "g_hidden": 32,
    "density_reference": 200,
    "batch_size": 50,
}


def clusters() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0.2, 0.8, size=(MODES, FEATURES)).astype(np.float32)


def normal(n: int, seed: int) -> np.ndarray:
    """Rows of MODES tight, well-separated clusters in [0, 1]^FEATURES."""
    rng = np.random.default_rng(seed)
    centres = clusters()
    rows = centres[rng.integers(MODES, size=n)] + 0.02 * rng.normal(size=(n, FEATURES))
    return rows.astype(np.float32)


def far(n: int, seed: int) -> np.ndarray:
    """Rows at least 0.3 from every cluster centre (15 cluster widths), inside [-0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    centres = clusters()
    rows = rng.uniform(-0.5, 1.5, size=(8 * n, FEATURES)).astype(np.float32)
    gap = np.linalg.norm(rows[:, None, :] - centres[None], axis=2).min(axis=1)
    kept = rows[gap > 0.3][:n]
    assert len(kept) == n
    return kept


def splits() -> Splits:
    return Splits(
        train=normal(1000, 1),
        val=normal(200, 2),
        test=np.concatenate([normal(100, 3), far(100, 4)]),
        test_labels=np.r_[np.zeros(100), np.ones(100)].astype(np.int64),
        input_spec=TabularInput(
            num_features=FEATURES, feature_names=[f"f{i}" for i in range(FEATURES)]
        ),
        dataset="clusters",
        protocol="custom",
        normal_classes=["0"],
        anomalous_classes=["1"],
        split_seed=0,
    )


def config(out: Path, epochs: int, **kw: object) -> TrainConfig:
    return TrainConfig(
        model="mmocgan",
        dataset="clusters",
        epochs=epochs,
        out=out,
        device="cpu",
        hparams=dict(HPARAMS),
        **kw,
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mmocgan") / "run"
    return Path(train(config(out, epochs=15), splits(), progress=False))


def test_score_is_a_probability_and_ranks_far_rows_above_the_normals(trained_run: Path) -> None:
    model, info = load_run(trained_run)
    data = splits()
    scores, recons = score_array(model, data.test)
    assert recons is None
    assert np.isfinite(scores).all() and scores.min() >= 0.0 and scores.max() <= 1.0
    normals, outliers = scores[:100], scores[100:]
    assert roc_auc_score(data.test_labels, scores) > 0.9
    assert np.median(outliers) > np.median(normals) + 0.2
    # The threshold is calibrated on validation normals, like every model's.
    assert 0.0 <= info.threshold.value <= 1.0
    assert "validation-normal score" in info.selection_rule


def test_q_tells_the_generated_modes_apart(trained_run: Path) -> None:
    model, _ = load_run(trained_run)
    codes = torch.arange(MODES).repeat_interleave(200)
    with torch.no_grad():
        samples = model.generate(codes, torch.Generator().manual_seed(0))
        recovered = model.mode_of(samples)
    accuracy = float((recovered == codes).float().mean())
    assert accuracy > 1.0 / MODES + 0.3


def test_target_density_marks_the_normals_as_its_high_density_region() -> None:
    data = splits()
    model = build_model("mmocgan", data.input_spec, **HPARAMS)
    x = torch.from_numpy(data.train)
    model.fit_input_space(x)
    ref = model.density_ref
    assert ref.shape == (200, FEATURES)
    # Every reference row is a training normal.
    assert bool(((ref[:, None] - x[None]).abs().sum(dim=2).min(dim=1).values == 0).all())
    with torch.no_grad():
        inside = model._log_density(torch.from_numpy(data.val)) > model.density_eps
        outside = model._log_density(torch.from_numpy(far(100, 5))) > model.density_eps
    # eps is the 5% quantile of the reference normals' own (leave-one-out) log-density.
    assert float(inside.float().mean()) > 0.85
    assert not bool(outside.any())
    # Fewer training rows than the reference size: drawn with replacement, same shape.
    small = build_model("mmocgan", data.input_spec, **HPARAMS)
    small.fit_input_space(x[:50])
    assert small.density_ref.shape == (200, FEATURES)
    assert torch.isfinite(small.density_eps) and small.density_bandwidth > 0


def test_mixture_conditioning_trains_its_per_mode_gaussians() -> None:
    torch.manual_seed(0)
    data = splits()
    model = build_model("mmocgan", data.input_spec, conditioning="mix", **HPARAMS)
    model.fit_input_space(torch.from_numpy(data.train))
    sigma = model.mode_sigma.detach().clone()
    assert model.mode_mu.shape == (MODES, 8)
    for i in range(3):
        losses = model.training_step(torch.from_numpy(data.train[100 * i : 100 * (i + 1)]))
    assert all(np.isfinite(v) for v in losses.values()) and losses["var"] > 0
    # The variance regulariser (1 - sigma)^2 pulls the initial 0.2 up.
    assert float(model.mode_sigma.detach().mean()) > float(sigma.mean())
    # G's input is the mode's Gaussian, not a one-hot code.
    assert model.gen[0].in_features == 8
    assert build_model("mmocgan", data.input_spec, **HPARAMS).gen[0].in_features == 8 + MODES


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("modes", 0, "must be at least 1"),
        ("density_reference", 1, "must be at least 2"),
        ("density_quantile", 1.0, r"must be in \(0, 1\)"),
        ("w_pt", -1.0, "must be non-negative"),
        ("conditioning", "gauss", "'cat' or 'mix'"),
    ],
)
def test_bad_hyperparameters_are_refused_naming_the_key(key: str, value: object, message: str):
    with pytest.raises(ValueError, match=f"hyperparameter {key}=.*{message}"):
        build_model("mmocgan", splits().input_spec, **{key: value})


def test_image_mode_samples_are_drawn_per_mode_and_drawn_as_a_picture(tmp_path: Path) -> None:
    from PIL import Image

    from training.report import modes_png

    spec = ImageInput(channels=1, height=16, width=16)
    model = build_model("mmocgan", spec, width=8, latent_dim=8, modes=4)
    normals = torch.rand(10, 1, 16, 16)
    assert model.training
    drawn = model.mode_samples(normals, per_mode=5)
    assert model.training  # drawing them leaves the model as it was
    assert drawn["fake"].shape == (4 * 5, 1, 16, 16)
    assert drawn["fake_modes"].tolist() == [m for m in range(4) for _ in range(5)]
    assert float(drawn["fake"].min()) >= 0.0 and float(drawn["fake"].max()) <= 1.0
    assert drawn["real_modes"].shape == (10,) and int(drawn["real_modes"].max()) < 4
    torch.testing.assert_close(model.mode_samples(normals, per_mode=5)["fake"], drawn["fake"])
    arrays = {k: v.numpy() for k, v in drawn.items()}
    with Image.open(modes_png(**arrays, path=tmp_path / "modes.png")) as picture:
        assert picture.format == "PNG" and picture.height > picture.width / 4


def test_the_report_draws_normals_and_complementary_samples_per_mode(
    trained_run: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from training.report import modes_png

    model, _ = load_run(trained_run)
    normals = torch.from_numpy(splits().val)
    drawn = {k: v.numpy() for k, v in model.mode_samples(normals, per_mode=50).items()}
    assert drawn["fake"].shape == (MODES * 50, FEATURES)
    # Q assigns the real normals to the modes it learnt from G: more than one of them.
    assert len(np.unique(drawn["real_modes"])) > 1
    with Image.open(modes_png(**drawn, path=tmp_path / "modes.png")) as picture:
        assert picture.format == "PNG"


def test_resume_after_interruption_is_exact(tmp_path: Path) -> None:
    full = train(config(tmp_path / "full", epochs=4), splits(), progress=False)
    train(config(tmp_path / "part", epochs=2), splits(), progress=False)
    resumed = train(config(tmp_path / "part", epochs=4, resume=True), splits(), progress=False)
    a, ia = load_run(full)
    b, ib = load_run(resumed)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in ia.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in ib.history]
    assert ia.selected_epoch == ib.selected_epoch and ia.threshold == ib.threshold
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    last_a = torch.load(Path(full) / CHECKPOINT_DIR / LAST_CHECKPOINT, weights_only=True)
    last_b = torch.load(Path(resumed) / CHECKPOINT_DIR / LAST_CHECKPOINT, weights_only=True)
    for (ka, va), (kb, vb) in zip(
        last_a["model_state"]["model"].items(), last_b["model_state"]["model"].items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.export import export_run

    models = tmp_path_factory.mktemp("mmoc-models")
    manifest, folder = export_run(trained_run, models, NAME)
    assert manifest.architecture == "mmocgan"
    assert manifest.outputs == ["score"] and not manifest.has_reconstruction
    assert not manifest.has_anomaly_map
    return models


def test_exported_graph_outputs_only_the_score_and_matches_pytorch(
    trained_run: Path, exported: Path
) -> None:
    session = ort.InferenceSession(
        str(exported / NAME / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [o.name for o in session.get_outputs()] == ["score"]
    x = splits().test
    served = session.run(None, {INPUT_NAME: x})[0]
    expected, _ = score_array(load_run(trained_run)[0], x)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["embedded", "redis"])
def test_served_scores_match_and_reconstructions_are_refused(
    backend: str,
    trained_run: Path,
    exported: Path,
    start_api,
    start_worker,
    request: pytest.FixtureRequest,
) -> None:
    settings: dict[str, object] = {}
    if backend == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        settings["redis_url"] = redis.url
        start_worker(redis.url, exported, "w-mmoc").wait_alive()
    api = start_api(exported, **settings).wait_ready()
    x = splits().test[[0, 1, 150, 151]]
    model, info = load_run(trained_run)
    expected, _ = score_array(model, x)
    body = {"model": NAME, "inputs": [{"array": row.tolist()} for row in x]}
    answer = httpx.post(f"{api.url}/score", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    np.testing.assert_allclose([r["score"] for r in results], expected, rtol=1e-4)
    assert [r["is_anomaly"] for r in results] == list(expected > info.threshold.value)
    asked = httpx.post(f"{api.url}/score", json={**body, "return_reconstruction": True})
    assert asked.status_code == 422
    assert asked.json()["detail"] == (
        f"model {NAME} version 1 has no reconstructions: its graph outputs only score"
    )


def test_cli_evaluate_of_a_multimodal_image_run_draws_its_modes(tmp_path: Path, capsys) -> None:
    """A user's path: train on several normal digits with the CLI, then `evaluate` the run
    folder; the report has the modes picture beside the ROC and histogram."""
    import json

    from PIL import Image

    from gansentry.cli import main
    from tests.data_factories import make_mnist

    data, run = tmp_path / "data", tmp_path / "run"
    make_mnist(data, n_train=300, n_test=60)
    argv = ["train", "--model", "mmocgan", "--dataset", "mnist", "--normal-class", "0,1,2"]
    argv += ["--data-root", data, "--out", run, "--no-progress", "--epochs", "1"]
    argv += ["--hparam", "width=8", "--hparam", "latent_dim=8", "--hparam", "modes=3"]
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data-root", str(data), "--json"]) == 0
    files = [Path(f) for f in json.loads(capsys.readouterr().out)["files"]]
    modes = [f for f in files if f.name == "modes.png"]
    assert modes, files
    with Image.open(modes[0]) as picture:
        assert picture.format == "PNG"


def test_a_small_table_trains_at_least_min_steps_updates(tmp_path: Path) -> None:
    """1,000 rows in batches of 50 are 20 updates an epoch: the default 2 epochs (here) are
    stretched to 5 to reach min_steps=100, while an explicit --epochs is taken as given."""
    hparams = {**HPARAMS, "epochs": 2, "min_steps": 100}

    def run(out: str, epochs: int | None) -> int:
        cfg = TrainConfig(
            model="mmocgan", dataset="clusters", epochs=epochs, out=tmp_path / out,
            device="cpu", hparams=hparams,
        )  # fmt: skip
        return load_run(train(cfg, splits(), progress=False))[1].epochs_done

    assert run("default", None) == 5
    assert run("given", 2) == 2


def _four_squares(n: int, seed: int) -> torch.Tensor:
    """32x32 images of one bright square in one of four quadrants: four modes."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.rand(n, 1, 32, 32, generator=gen)
    quadrant = torch.randint(4, (n,), generator=gen)
    for i, q in enumerate(quadrant.tolist()):
        r, c = divmod(q, 2)
        x[i, 0, 4 + 14 * r : 14 + 14 * r, 4 + 14 * c : 14 + 14 * c] += 0.9
    return x


def test_q_tells_the_generated_modes_apart_on_images() -> None:
    """The MI loss reaches G and Q through the conv nets: with a weight that holds its own
    beside feature matching over D's wide features (512 here, 2,048 at the default
    width), G draws each code's samples apart and Q recovers the code. With the BatchNorm
    D the diagnosis measured: the spectrally normalised one (the default) gets there too,
    but in about four times the updates (300: accuracy 1.0), too long for a unit test."""
    torch.manual_seed(0)
    spec = ImageInput(channels=1, height=32, width=32)
    hparams = {"width": 8, "modes": 4, "latent_dim": 16, "batch_size": 32, "w_mi": 30.0}
    model = build_model("mmocgan", spec, **hparams, d_spectral_norm=False)
    x = _four_squares(2000, 0)
    model.fit_input_space(x)
    for _ in range(80):
        losses = model.training_step(x[torch.randint(len(x), (32,))])
    assert all(np.isfinite(v) for v in losses.values())
    codes = torch.arange(4).repeat_interleave(100)
    with torch.no_grad():
        samples = model.generate(codes, torch.Generator().manual_seed(0))
        # G draws in model space; `mode_of` reads the contract's [0, 1].
        recovered = model.mode_of(model.from_model_space(samples))
        accuracy = float((recovered == codes).float().mean())
    assert accuracy > 0.8  # chance: 0.25


TINY_IMAGE_MMOC = {"width": 8, "latent_dim": 8, "modes": 3, "density_reference": 16}


def _largest_singular_values(model) -> list[float]:
    convs = [m for m in model.disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs
    with torch.no_grad():
        return [float(torch.linalg.matrix_norm(m.weight.flatten(1), ord=2)) for m in convs]


def test_image_discriminator_is_spectrally_normalised_and_resumes_exactly(tmp_path: Path) -> None:
    """Every convolution of D is divided by its largest singular value (power iteration
    state in the checkpoint), so a run interrupted mid-way resumes to the same weights."""
    from tests.test_train import assert_same_run, cfg, image_splits

    common = dict(model="mmocgan", hparams=dict(TINY_IMAGE_MMOC), dataset="x")
    full = train(cfg(tmp_path, "full", epochs=3, **common), image_splits(), progress=False)
    train(cfg(tmp_path, "part", epochs=1, **common), image_splits(), progress=False)
    resumed = train(
        cfg(tmp_path, "part", epochs=3, resume=True, **common), image_splits(), progress=False
    )
    assert_same_run(full, resumed)
    net, _ = load_run(resumed)
    assert net.hparams["d_spectral_norm"] is True
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.disc.modules())
    # One power-iteration step per training forward: after a few dozen updates the
    # estimate is within a few percent, where the raw weights (N(0, 0.02) at the start)
    # have norms of 0.1-0.3.
    for sigma in _largest_singular_values(net):
        assert sigma == pytest.approx(1.0, abs=0.15)
    raw = [
        m.parametrizations.weight.original
        for m in net.disc.modules()
        if hasattr(m, "parametrizations")
    ]
    assert raw and all(
        float(torch.linalg.matrix_norm(w.detach().flatten(1), ord=2)) < 0.5 for w in raw
    )


def test_a_run_saved_before_spectral_norm_existed_loads_as_it_trained(tmp_path: Path) -> None:
    """Runs trained before the image D was spectrally normalised recorded no
    `d_spectral_norm`: they load with the unnormalised D they trained, not the new
    default, and score as before."""
    import json

    from tests.test_train import cfg, image_splits

    hparams = {**TINY_IMAGE_MMOC, "d_spectral_norm": False}
    run = train(
        cfg(tmp_path, "old", epochs=1, model="mmocgan", hparams=hparams, dataset="x"),
        image_splits(),
        progress=False,
    )
    before, _ = load_run(run)
    record = run / "run.json"
    saved = json.loads(record.read_text())
    del saved["hparams"]["d_spectral_norm"]
    record.write_text(json.dumps(saved))
    after, info = load_run(run)
    assert "d_spectral_norm" not in info.hparams
    assert after.hparams["d_spectral_norm"] is False
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in after.disc.modules())
    x = image_splits().test
    np.testing.assert_array_equal(score_array(after, x)[0], score_array(before, x)[0])
