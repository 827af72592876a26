"""GANomaly (Akcay et al. 2018): encoder-decoder-encoder generator, anomaly score =
distance between the latent code of x and that of its reconstruction (`latent`, the
paper's). Alternatives: the L1 reconstruction error, a Gaussian on the encoder's features
(`feature-mahalanobis`), and the distance from the first encoder's code to the nearest code
of a training normal (`knn`)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from training.models.base import AnomalyGAN, InputSpec, bce
from training.models.blocks import (
    ConvDecoder,
    ConvEncoder,
    MlpEncoder,
    image_side,
    init_weights,
    mlp,
)
from training.models.registry import FeatureGaussianHparams, Hparams, ImageHparams, register

D_COLLAPSE = 1e-5
ScoreMethod = Literal["latent", "feature-mahalanobis", "reconstruction", "knn"]


class _Shared(Hparams, FeatureGaussianHparams):
    """Both input kinds: the paper's generator loss weights (the reconstruction term
    dominates) and the fitted scores' settings."""

    w_adv: float = 1.0
    w_con: float = 50.0
    w_enc: float = 1.0
    knn_max_reference: int = 50_000


class GANomalyImage(ImageHparams, _Shared):
    # The paper's latent score on raw pixels suits MNIST-like data and brightness defects;
    # feature-mahalanobis is the CIFAR-10 recipe, with contrast_norm.
    batch_size: int = 64
    epochs: int = 10
    latent_dim: int = 100
    score_method: ScoreMethod = "latent"


class GANomalyTabular(_Shared):
    # knn: the paper's latent score ranks below chance on some tables.
    batch_size: int = 64
    epochs: int = 5
    latent_dim: int = 32
    hidden: list[int] = [64]
    disc_hidden: list[int] = [128, 128]
    score_method: ScoreMethod = "knn"


@register("ganomaly", image=GANomalyImage, tabular=GANomalyTabular)
class GANomaly(AnomalyGAN):
    selection_rule = "lowest mean validation-normal L1 reconstruction error"

    def __init__(self, spec: InputSpec, **hparams: Any):
        super().__init__(spec, hparams)
        nz = hparams["latent_dim"]
        if self.is_image:
            c, side, w = spec.channels, image_side(spec), hparams["width"]
            self.enc1 = ConvEncoder(c, side, nz, w)
            self.dec = ConvDecoder(c, side, nz, w)
            self.enc2 = ConvEncoder(c, side, nz, w)
            self.disc = ConvEncoder(c, side, 1, w)
        else:
            f, hidden = spec.num_features, hparams["hidden"]
            self.enc1 = MlpEncoder([f, *hidden, nz])
            self.dec = mlp([nz, *reversed(hidden), f], act=nn.ReLU)
            self.enc2 = MlpEncoder([f, *hidden, nz])
            self.disc = MlpEncoder([f, *hparams["disc_hidden"], 1])
        init_weights(self)
        self.register_buffer("d_reinits", torch.zeros((), dtype=torch.long))
        self._init_feature_gaussian(self.enc1)

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        gen = [*self.enc1.parameters(), *self.dec.parameters(), *self.enc2.parameters()]
        return {"g": self._adam(gen), "d": self._adam(self.disc.parameters())}

    def _generate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = self.enc1(x)[0]
        x_hat = self.dec(z)
        return z, x_hat, self.enc2(x_hat)[0]

    def training_step(self, x: Tensor) -> dict[str, float]:
        self.train()
        h, opt = self.hparams, self.optimizers
        x = self.to_model_space(x)
        z, x_hat, z_hat = self._generate(x)

        opt["g"].zero_grad(set_to_none=True)
        _, f_real = self.disc(x)
        _, f_fake = self.disc(x_hat)
        l_adv = (f_real.detach() - f_fake).pow(2).mean()
        l_con = (x - x_hat).abs().mean()
        l_enc = (z - z_hat).pow(2).mean()
        l_g = h["w_adv"] * l_adv + h["w_con"] * l_con + h["w_enc"] * l_enc
        l_g.backward()
        opt["g"].step()

        opt["d"].zero_grad(set_to_none=True)
        logit_real = self.disc(x)[0].flatten()
        logit_fake = self.disc(x_hat.detach())[0].flatten()
        l_d = 0.5 * (bce(logit_real, 1.0) + bce(logit_fake, 0.0))
        l_d.backward()
        opt["d"].step()
        if l_d.item() < D_COLLAPSE:
            init_weights(self.disc)
            self.d_reinits += 1
        return {
            "g": l_g.item(),
            "d": l_d.item(),
            "adv": l_adv.item(),
            "con": l_con.item(),
            "enc": l_enc.item(),
        }

    def code(self, x: Tensor) -> Tensor:
        return self.enc1(self.to_model_space(x))[0]

    def features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self._encode(self.enc1, self.to_model_space(x))[1:]

    def score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xm = self.to_model_space(x)
        z, features, pooled = self._encode(self.enc1, xm)
        x_hat = self.dec(z)
        recon = self.from_model_space(x_hat, x)
        method = self.hparams["score_method"]
        if method == "knn":
            return self.nearest(z), recon
        if method == "reconstruction":
            return (xm - x_hat).abs().flatten(1).mean(dim=1), recon
        if self.feature_scored:
            return self.feature_score(x, features, pooled), recon
        return (z - self.enc2(x_hat)[0]).pow(2).mean(dim=1), recon

    def selection_metric(self, x: Tensor) -> Tensor:
        # The latent score's scale drifts between epochs; pixel error does not.
        _, x_hat, _ = self._generate(self.to_model_space(x))
        return (self.to_model_space(x) - x_hat).abs().flatten(1).mean(dim=1)

