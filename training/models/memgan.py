"""MEMGAN (Yang et al. 2020): a BiGAN with a learnable memory M in latent space. Encodings
are projected onto the convex hull of M, P(z) = softmax(z M^T) M; normal data lies inside
it, anomalies do not and reconstruct poorly, so the score is ||x - G(P(E(x)))||_2."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from training.models.base import AnomalyGAN, InputSpec, bce
from training.models.bigan import build_bigan
from training.models.blocks import init_weights


class MEMGAN(AnomalyGAN):
    arch = "memgan"
    selection_rule = "lowest mean validation-normal score"

    def __init__(self, spec: InputSpec, **hparams: Any):
        super().__init__(spec, hparams)
        self.enc, self.gen, self.disc = build_bigan(spec, hparams)
        init_weights(self)
        self.memory = nn.Parameter(torch.randn(hparams["memory_units"], hparams["latent_dim"]))

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        gen = [*self.enc.parameters(), *self.gen.parameters(), self.memory]
        return {"g": self._adam(gen), "d": self._adam(self.disc.parameters())}

    def attention(self, z: Tensor) -> Tensor:
        return torch.softmax(z @ self.memory.t(), dim=1)

    def project(self, z: Tensor) -> Tensor:
        return self.attention(z) @ self.memory

    def training_step(self, x: Tensor) -> dict[str, float]:
        self.train()
        h, opt = self.hparams, self.optimizers
        x = self.to_model_space(x)
        n = h["memory_units"]
        alpha = torch.full((x.shape[0], n), h["dirichlet_alpha"], device=x.device)
        beta = torch.distributions.Dirichlet(alpha).sample()

        opt["d"].zero_grad(set_to_none=True)
        z_real = self.enc(x)[0]
        z_fake = beta @ self.memory
        x_fake = self.gen(z_fake)
        l_d = bce(self.disc(x, z_real.detach())[0], 1.0) + bce(
            self.disc(x_fake.detach(), z_fake.detach())[0], 0.0
        )
        l_d.backward()
        opt["d"].step()

        opt["g"].zero_grad(set_to_none=True)
        l_adv = bce(self.disc(x, z_real)[0], 0.0) + bce(self.disc(x_fake, z_fake)[0], 1.0)
        z_proj = self.project(z_real)
        l_cycle = (x - self.gen(z_proj)).flatten(1).norm(dim=1).mean()
        l_mem = (z_proj - z_real).norm(dim=1).mean()
        beta_hat = self.attention(self.enc(x_fake)[0])
        l_mi = -(beta * torch.log(beta_hat + 1e-8)).sum(dim=1).mean()
        loss = h["w_adv"] * l_adv + h["w_cycle"] * l_cycle + h["w_mem"] * l_mem + h["w_mi"] * l_mi
        loss.backward()
        opt["g"].step()
        return {
            "d": l_d.item(),
            "adv": l_adv.item(),
            "cycle": l_cycle.item(),
            "mem": l_mem.item(),
            "mi": l_mi.item(),
        }

    def score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xm = self.to_model_space(x)
        x_rec = self.gen(self.project(self.enc(xm)[0]))
        return (xm - x_rec).flatten(1).norm(dim=1), self.from_model_space(x_rec, x)

    @torch.no_grad()
    def visuals(self) -> dict[str, Tensor]:
        if not self.is_image:
            return {}
        was_training = self.training
        self.eval()
        units = self.from_model_space(self.gen(self.memory)).clamp(0.0, 1.0)
        self.train(was_training)
        return {"memory_units": units}
