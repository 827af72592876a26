"""MEMGAN (Yang et al. 2020): a BiGAN with a learnable memory M in latent space. Encodings
are projected onto the convex hull of M, P(z) = softmax(z M^T) M; normal data lies inside
it, anomalies do not and reconstruct poorly, so the paper's score is ||x - G(P(E(x)))||_2
(`reconstruction`). Alternatives: how far the projection moves the code, ||E(x) - P(E(x))||
(`memory`), the distance from E(x) to the nearest code of a training normal (`knn`), and
a Gaussian on the encoder's last hidden features (`feature-mahalanobis`, the natural-photo
recipe with contrast_norm)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from training.models.base import AnomalyGAN, InputSpec, bce
from training.models.bigan import build_bigan
from training.models.blocks import init_weights
from training.models.registry import FeatureGaussianHparams, Hparams, ImageHparams, register

ScoreMethod = Literal["reconstruction", "memory", "knn", "feature-mahalanobis"]


class _Memory(Hparams, FeatureGaussianHparams):
    """The paper's loss weights and uniform Dirichlet prior over the memory units."""

    dirichlet_alpha: float = 1.0
    w_adv: float = 1.0
    w_cycle: float = 1.0
    w_mem: float = 1.0
    w_mi: float = 1.0
    knn_max_reference: int = 50_000


class MEMGANImage(ImageHparams, _Memory):
    """The paper's discriminator at half width (256/256/512), and a higher lr with smaller
    batches than the paper (5e-4, 64): more updates in the minutes a CPU has. The paper's
    reconstruction score stays: on images it ranks better than the nearest code. The cycle
    term weighs 10: at weight 1 the adversarial terms take over after the first epoch and
    the reconstruction score of the selected (last) epoch decays; at 10 it holds."""

    lr: float = 5e-4
    batch_size: int = 64
    epochs: int = 6
    w_cycle: float = 10.0
    latent_dim: int = 64
    memory_units: int = 50
    d_x_hidden: int = 256
    d_z_hidden: int = 256
    d_joint_hidden: int = 512
    d_dropout: float = 0.5
    score_method: ScoreMethod = "reconstruction"


class MEMGANTabular(_Memory):
    """knn: the reconstruction error flags rare normal records, the nearest code does not,
    and it needs fewer epochs."""

    lr: float = 1e-4
    batch_size: int = 128
    epochs: int = 3
    latent_dim: int = 32
    memory_units: int = 100
    enc_hidden: list[int] = [64]
    gen_hidden: list[int] = [64, 128]
    d_x_hidden: int = 128
    d_z_hidden: int = 128
    d_joint_hidden: int = 128
    d_dropout: float = 0.2
    score_method: ScoreMethod = "knn"


@register("memgan", image=MEMGANImage, tabular=MEMGANTabular)
class MEMGAN(AnomalyGAN):
    selection_rule = "lowest mean validation-normal reconstruction error"

    def __init__(self, spec: InputSpec, **hparams: Any):
        super().__init__(spec, hparams)
        self.enc, self.gen, self.disc = build_bigan(spec, hparams)
        init_weights(self)
        self.memory = nn.Parameter(torch.randn(hparams["memory_units"], hparams["latent_dim"]))
        self._init_feature_gaussian(self.enc)

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

    def code(self, x: Tensor) -> Tensor:
        return self.enc(self.to_model_space(x))[0]

    def features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self._encode(self.enc, self.to_model_space(x))[1:]

    def score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xm = self.to_model_space(x)
        # One encoder pass for the code and the features.
        z, features, pooled = self._encode(self.enc, xm)
        z_proj = self.project(z)
        x_rec = self.gen(z_proj)
        recon = self.from_model_space(x_rec, x)
        method = self.hparams["score_method"]
        if method == "knn":
            return self.nearest(z), recon
        if self.feature_scored:
            return self.feature_score(x, features, pooled), recon
        if method == "memory":
            return (z - z_proj).norm(dim=1), recon
        return (xm - x_rec).flatten(1).norm(dim=1), recon

    def selection_metric(self, x: Tensor) -> Tensor:
        # The paper's score, whichever score is used: it needs nothing fitted.
        xm = self.to_model_space(x)
        return (xm - self.gen(self.project(self.enc(xm)[0]))).flatten(1).norm(dim=1)

    @torch.no_grad()
    def visuals(self) -> dict[str, Tensor]:
        if not self.is_image:
            return {}
        was_training = self.training
        self.eval()
        units = self.from_model_space(self.gen(self.memory)).clamp(0.0, 1.0)
        self.train(was_training)
        return {"memory_units": units}
