"""Each registered detector at image and tabular shapes: output shapes and dtypes,
deterministic eval-mode scoring, and an ONNX export whose ONNX Runtime scores match
PyTorch's. The generic tests run every architecture in the registry without naming it, so
a new model file is tested by them as soon as it registers."""

from __future__ import annotations

import pytest
import torch

from gansentry.manifest import ImageInput, TabularInput
from training.models import ARCHITECTURES, build_model, default_hparams
from training.models.registry import hparams_class, lookup, offers_score
from training.onnx_export import export_onnx

IMAGE = ImageInput(channels=1, height=32, width=32)
RGB28 = ImageInput(channels=3, height=28, width=28)
TABULAR = TabularInput(num_features=13, feature_names=[f"f{i}" for i in range(13)])
# Small sizes keep the suite fast; the architecture is the same as the defaults'. Each
# applies to the models that have that hyperparameter.
SMALL = {
    "image": {
        "width": 8,
        "latent_dim": 16,
        "d_x_hidden": 32,
        "d_z_hidden": 32,
        "d_joint_hidden": 64,
        "memory_units": 10,
    },
    "tabular": {"latent_dim": 8, "memory_units": 10},
}


def cases(*specs: ImageInput | TabularInput) -> list:
    """(architecture, spec) for every registered architecture that takes that input kind."""
    return [
        pytest.param(a, s, id=f"{a}-{s.kind}{'x'.join(map(str, s.shape))}")
        for a in ARCHITECTURES
        for s in specs
        if s.kind in lookup(a).hparams
    ]


def kinds(arch: str) -> list[ImageInput | TabularInput]:
    return [s for s in (IMAGE, TABULAR) if s.kind in lookup(arch).hparams]


def small(arch: str, spec: ImageInput | TabularInput) -> dict:
    names = default_hparams(arch, spec)
    return {k: v for k, v in SMALL[spec.kind].items() if k in names}


def batch(spec: ImageInput | TabularInput, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, *spec.shape, generator=g)


def fit(model, spec: ImageInput | TabularInput) -> None:
    """What training does after selection: fit the score on (other) normals, if it needs it."""
    model.fit_score(torch.rand(16, *spec.shape, generator=torch.Generator().manual_seed(7)))


@pytest.mark.parametrize(("arch", "spec"), cases(IMAGE, RGB28, TABULAR))
def test_shapes_training_step_and_deterministic_score(arch, spec):
    torch.manual_seed(0)
    model = build_model(arch, spec, **small(arch, spec))
    x = batch(spec)
    losses = model.training_step(x)
    assert losses and all(isinstance(v, float) and v == v for v in losses.values())
    fit(model, spec)
    model.eval()
    with torch.no_grad():
        score, recon = model.score(x)
        score2, recon2 = model.score(x)
        single, _ = model.score(x[:1])
    assert score.shape == (6,) and score.dtype == torch.float32
    assert torch.equal(score, score2)
    # Eval mode: a sample's score does not depend on the rest of its batch.
    torch.testing.assert_close(single, score[:1], rtol=1e-4, atol=1e-6)
    if not model.reconstructs:
        assert recon is None and recon2 is None
        return
    assert recon.shape == x.shape and recon.dtype == torch.float32
    assert torch.equal(recon, recon2)
    if spec.kind == "image":
        assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0


@pytest.mark.parametrize(("arch", "spec"), cases(IMAGE, TABULAR))
def test_onnx_export_parity(arch, spec, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch, spec, **small(arch, spec))
    for _ in range(2):
        model.training_step(batch(spec, 8))
    fit(model, spec)
    scorer = model.scorer()
    assert not scorer.training
    rel = export_onnx(scorer, batch(spec, 5), tmp_path / "m.onnx")
    assert rel <= 1e-4
    # The scorer is a copy: exporting it leaves the trained model in training mode.
    assert model.training


def test_scorer_matches_model_score():
    torch.manual_seed(0)
    model = build_model("egbad", TABULAR, **small("egbad", TABULAR))
    model.training_step(batch(TABULAR, 8))
    fit(model, TABULAR)
    model.eval()
    x = batch(TABULAR)
    with torch.no_grad():
        torch.testing.assert_close(model.scorer()(x), model.score(x))


def test_egbad_latent_score_is_the_codes_round_trip():
    torch.manual_seed(0)
    h = {**small("egbad", TABULAR), "score_method": "latent"}
    model = build_model("egbad", TABULAR, **h)
    model.training_step(batch(TABULAR, 8))
    model.eval()
    x = batch(TABULAR)
    with torch.no_grad():
        score, recon = model.score(x)
        z = model.ema_enc(model.to_model_space(x))[0]
        x_rec = model.ema_gen(z)
        expected = (z - model.ema_enc(x_rec)[0]).pow(2).sum(dim=1)
    torch.testing.assert_close(score, expected)
    torch.testing.assert_close(recon, model.from_model_space(x_rec, x))
    # The paper's scores are still there, and differ from it.
    other = build_model("egbad", TABULAR, **{**h, "score_method": "cross-e"})
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(other.eval().score(x)[0], score)


def test_memgan_visuals_are_decoded_memory_units():
    model = build_model("memgan", IMAGE, **small("memgan", IMAGE))
    units = model.visuals()["memory_units"]
    assert units.shape == (10, 1, 32, 32)
    assert float(units.min()) >= 0.0 and float(units.max()) <= 1.0
    assert build_model("memgan", TABULAR, **small("memgan", TABULAR)).visuals() == {}


def test_bad_arguments_are_named():
    choices = ", ".join(ARCHITECTURES)
    with pytest.raises(ValueError, match=f"unknown model 'anogan'; choose one of {choices}$"):
        build_model("anogan", IMAGE)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_model("ganomaly", ImageInput(channels=1, height=30, width=30))
    with pytest.raises(ValueError, match="square"):
        build_model("memgan", ImageInput(channels=1, height=32, width=64))
    with pytest.raises(ValueError, match="latnet_dim"):
        build_model("egbad", TABULAR, latnet_dim=4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_hparams_are_complete_and_fresh(arch):
    for spec in kinds(arch):
        h = default_hparams(arch, spec)
        assert {"lr", "beta1", "beta2", "batch_size", "epochs", "latent_dim"} <= set(h)
        h["latent_dim"] = -1
        assert default_hparams(arch, spec)["latent_dim"] > 0
        # Every list default is a fresh copy too.
        for key, value in h.items():
            if isinstance(value, list):
                value.append(-1)
                assert default_hparams(arch, spec)[key] != value


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_values_for_runs_saved_before_a_field_existed_are_valid_and_not_the_default(arch):
    """`saved_before` names fields of its class, with values the class accepts and that
    differ from today's default (otherwise the entry would do nothing)."""
    for spec in kinds(arch):
        cls = hparams_class(arch, spec)
        defaults = default_hparams(arch, spec)
        for key, value in cls.saved_before.items():
            assert key in cls.model_fields, key
            assert value != defaults[key], key
            assert getattr(cls(**{key: value}), key) == value


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hyperparameters_of_the_wrong_type_are_refused_naming_the_key(arch):
    for spec in kinds(arch):
        with pytest.raises(ValueError, match=r"hyperparameter epochs='many' for " + arch):
            build_model(arch, spec, epochs="many")
        with pytest.raises(ValueError, match="latent_dim"):
            build_model(arch, spec, latent_dim=0)
        # Declared types convert what the CLI's JSON gives: 3.0 epochs is 3.
        assert hparams_class(arch, spec)(epochs=3.0).epochs == 3


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if "image" in lookup(a).hparams])
def test_contrast_normalisation_is_fitted_exported_and_ignores_brightness(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch, RGB28, contrast_norm=True, **small(arch, RGB28))
    train_x = batch(RGB28, 16)
    model.fit_input_space(train_x)
    centred = train_x - train_x.mean(dim=(1, 2, 3), keepdim=True)
    g = centred / centred.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert model.gcn_low.item() == pytest.approx(g.min().item(), rel=1e-5)
    assert model.gcn_high.item() == pytest.approx(g.max().item(), rel=1e-5)
    model.training_step(train_x[:8])
    fit(model, RGB28)  # as training does: EGBAD's image default (knn) needs its normals
    model.eval()
    x = batch(RGB28, 5)
    with torch.no_grad():
        score, recon = model.score(x)
        dimmer, _ = model.score(0.5 * x + 0.2)
    # The per-image contrast and brightness are normalised away before the networks.
    torch.testing.assert_close(dimmer, score, rtol=1e-3, atol=1e-5)
    assert recon is None or (float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0)
    # The fitted range travels with the weights into the scorer copy and the ONNX graph.
    scorer = model.scorer()
    assert scorer.model.gcn_high.item() == model.gcn_high.item()
    assert export_onnx(scorer, x, tmp_path / "m.onnx") <= 1e-4


def test_contrast_normalisation_is_off_by_default():
    assert default_hparams("ganomaly", IMAGE)["contrast_norm"] is False
    assert "gcn_low" not in dict(
        build_model("ganomaly", IMAGE, **small("ganomaly", IMAGE)).named_buffers()
    )


# Every registered architecture that offers the fitted feature-Gaussian score.
FEATURE_SCORED = [a for a in ARCHITECTURES if offers_score(a, RGB28, "feature-mahalanobis")]


def test_the_feature_score_is_offered_beyond_ganomaly():
    # One shared implementation (AnomalyGAN.feature_score), several encoders.
    assert len(FEATURE_SCORED) >= 3


@pytest.mark.parametrize(
    ("contrast_norm", "layers"), [(False, "last"), (True, "last"), (True, "all")]
)
@pytest.mark.parametrize("arch", FEATURE_SCORED)
def test_feature_mahalanobis_score_is_fitted_on_normals_and_exported(
    arch, contrast_norm, layers, tmp_path
):
    torch.manual_seed(0)
    model = build_model(
        arch,
        RGB28,
        score_method="feature-mahalanobis",
        contrast_norm=contrast_norm,
        feature_layers=layers,
        **small(arch, RGB28),
    )
    g = torch.Generator().manual_seed(3)
    normal = 0.5 + 0.05 * torch.randn(64, *RGB28.shape, generator=g)
    model.fit_input_space(normal)
    model.training_step(normal[:16])
    model.eval()
    assert model.score_is_fitted
    model.fit_score(normal)
    with torch.no_grad():
        feats, pooled = model.features(normal)
        torch.testing.assert_close(model.feature_mean, feats.mean(dim=0), rtol=1e-4, atol=1e-5)
        # Whitened training features have unit variance along the well-populated directions.
        whitened = (feats - model.feature_mean) @ model.feature_whitening
        assert whitened.var(dim=0).max().item() <= 1.0 + 1e-3
        # `all`: one Gaussian per convolution of the encoder (28x28 -> 14, 7: two), on its
        # channel means; `last`: none.
        assert len(pooled) == model.pooled_layers == (2 if layers == "all" else 0)
        for i, layer in enumerate(pooled):
            mean, whitening = model._pooled_gaussian(i)
            torch.testing.assert_close(mean, layer.mean(dim=0), rtol=1e-4, atol=1e-5)
            assert ((layer - mean) @ whitening).var(dim=0).max().item() <= 1.0 + 1e-3
        if contrast_norm:  # the removed statistics get their own Gaussian
            stats = model.image_statistics(normal)
            torch.testing.assert_close(model.stats_mean, stats.mean(dim=0), rtol=1e-4, atol=1e-5)
        normal_scores, _ = model.score(normal[:8])
        odd_scores, _ = model.score(torch.rand(8, *RGB28.shape, generator=g))
    assert odd_scores.min() > normal_scores.max()
    assert export_onnx(model.scorer(), normal[:5], tmp_path / "m.onnx") <= 1e-4


@pytest.mark.parametrize("arch", FEATURE_SCORED)
def test_pooled_feature_layers_add_to_the_last_layers_score(arch):
    """`feature_layers=all` scores the last layer's Gaussian plus one per pooled layer; a
    tabular encoder has no layers to pool, so there both settings score alike."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    for spec, expect_pooled in ((RGB28, True), (TABULAR, False)):
        normal = torch.rand(64, *spec.shape, generator=g)
        models = {}
        for layers in ("last", "all"):
            torch.manual_seed(0)
            m = build_model(
                arch,
                spec,
                score_method="feature-mahalanobis",
                feature_layers=layers,
                **small(arch, spec),
            )
            m.fit_input_space(normal)
            m.eval()
            m.fit_score(normal)
            models[layers] = m
        with torch.no_grad():
            last, _ = models["last"].score(normal[:8])
            both, _ = models["all"].score(normal[:8])
            _, pooled = models["all"].features(normal[:8])
            extra = sum(
                ((p - mean) @ w).pow(2).mean(dim=1)
                for p, (mean, w) in zip(
                    pooled, map(models["all"]._pooled_gaussian, range(len(pooled))), strict=True
                )
            )
        assert (len(pooled) > 0) == expect_pooled
        torch.testing.assert_close(both, last + extra if expect_pooled else last)


def test_unknown_score_method_is_refused():
    with pytest.raises(ValueError, match="score_method"):
        build_model("ganomaly", IMAGE, score_method="typo", **small("ganomaly", IMAGE))
