"""GANomaly (Akcay et al. 2018): encoder-decoder-encoder generator, anomaly score =
distance between the latent code of x and that of its reconstruction."""

from __future__ import annotations

from typing import Any

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

D_COLLAPSE = 1e-5


class GANomaly(AnomalyGAN):
    arch = "ganomaly"
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

    def score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, x_hat, z_hat = self._generate(self.to_model_space(x))
        return (z - z_hat).pow(2).mean(dim=1), self.from_model_space(x_hat, x)

    def selection_metric(self, x: Tensor) -> Tensor:
        # The latent score's scale drifts between epochs; pixel error does not.
        _, x_hat, _ = self._generate(self.to_model_space(x))
        return (self.to_model_space(x) - x_hat).abs().flatten(1).mean(dim=1)
