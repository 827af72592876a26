"""f-AnoGAN (Schlegl et al. 2019): AnoGAN without its per-input latent search. Training has
two phases: a Wasserstein GAN with gradient penalty (WGAN-GP, Gulrajani et al. 2017), then,
with the generator G and the critic D frozen, an encoder E trained so that G(E(x)) gives x
back both in pixels and in the critic's features (the paper's "izi_f" encoder). The score
is that same loss per input,

    ||x - G(E(x))||^2 / n + kappa * ||f(x) - f(G(E(x)))||^2 / n_f,

with f the critic's last hidden layer, so E -> G -> D exports as one feed-forward graph.
The `knn` score ranks by the distance from E(x) to the nearest training normal's code
instead (`NearestCode`, shared by every architecture)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

import torch
from torch import Tensor, nn

from training.models.base import AnomalyGAN, InputSpec
from training.models.blocks import (
    ConvDecoder,
    ConvEncoder,
    MlpEncoder,
    image_side,
    init_weights,
    mlp,
)
from training.models.registry import (
    FeatureGaussianHparams,
    ImageHparams,
    Phase,
    PhasedHparams,
    register,
)

ScoreMethod = Literal["izi_f", "knn", "feature-mahalanobis"]

PHASES = (Phase("gan", "gan_epochs"), Phase("encoder", "encoder_epochs"))


class _FAnoGAN(PhasedHparams, FeatureGaussianHparams):
    """WGAN-GP's published settings, which f-AnoGAN trains with: Adam lr 1e-4 with betas
    (0.0, 0.9), not the (0.5, 0.9) many re-implementations use; five critic updates per
    generator update; gradient penalty weight 10. The encoder phase uses the same Adam
    settings; kappa = 1 weighs the critic-feature residual as the paper does."""

    phases = PHASES

    lr: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.9
    batch_size: int = 64
    gan_epochs: int = 5
    encoder_epochs: int = 3
    n_critic: int = 5
    gp_weight: float = 10.0
    kappa: float = 1.0
    score_method: ScoreMethod = "izi_f"
    knn_max_reference: int = 50_000

    @field_validator("gan_epochs", "encoder_epochs", "n_critic")
    @classmethod
    def _at_least_one_each(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value


class FAnoGANImage(_FAnoGAN, ImageHparams):
    """DCGAN-style nets from the shared blocks, sized so that one MNIST class (about 6,000
    32x32 images) trains both phases in minutes on a CPU. Images score by the nearest
    training code too: on the development digits it ranks well above izi_f, whose
    generator is far from trained at this budget (benchmarks/notes.md)."""

    latent_dim: int = 100
    score_method: ScoreMethod = "knn"


class FAnoGANTabular(_FAnoGAN):
    """MLPs of about EGBAD's KDD size. Tables score by the nearest training code, as every
    architecture does on tables: the izi_f score misses anomalies that lie between normal
    clusters, where the generator interpolates (benchmarks/notes.md)."""

    latent_dim: int = 32
    score_method: ScoreMethod = "knn"
    enc_hidden: list[int] = [64]
    gen_hidden: list[int] = [64, 128]
    critic_hidden: list[int] = [128, 64]


@register("fanogan", image=FAnoGANImage, tabular=FAnoGANTabular)
class FAnoGAN(AnomalyGAN):
    phases = PHASES
    selection_rule = "lowest mean validation-normal izi_f score (encoder phase)"

    def __init__(self, spec: InputSpec, **hparams: Any):
        super().__init__(spec, hparams)
        nz = hparams["latent_dim"]
        if self.is_image:
            c, side, w = spec.channels, image_side(spec), hparams["width"]
            self.enc: nn.Module = ConvEncoder(c, side, nz, w)
            self.gen: nn.Module = ConvDecoder(c, side, nz, w)
            self.disc: nn.Module = ConvEncoder(c, side, 1, w, batch_norm=False)
        else:
            f = spec.num_features
            self.enc = MlpEncoder([f, *hparams["enc_hidden"], nz])
            self.gen = mlp([nz, *hparams["gen_hidden"], f])
            self.disc = MlpEncoder([f, *hparams["critic_hidden"], 1])
        init_weights(self)
        # Counts critic updates across epochs, so the generator's turn (every n_critic-th
        # step) survives a resume.
        self.register_buffer("critic_steps", torch.zeros((), dtype=torch.long))
        self._init_feature_gaussian(self.enc)
        self.start_phase(PHASES[0].name)

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {
            "g": self._adam(self.gen.parameters()),
            "d": self._adam(self.disc.parameters()),
            "e": self._adam(self.enc.parameters()),
        }

    def start_phase(self, name: str) -> None:
        """gan: G and the critic train, E waits; encoder: only E trains."""
        super().start_phase(name)
        gan = name == "gan"
        self.gen.requires_grad_(gan)
        self.disc.requires_grad_(gan)
        self.enc.requires_grad_(not gan)
        self.train(self.training)

    def train(self, mode: bool = True) -> FAnoGAN:
        """In the encoder phase G stays in eval mode: its batch-norm statistics are part of
        the frozen generator, and E must learn to invert the G that scoring uses."""
        super().train(mode)
        if mode and self.phase == "encoder":
            self.gen.eval()
        return self

    def _critic(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """-> (critic value [N], last hidden features [N, n_f])."""
        value, features = self.disc(x)
        return value.flatten(), features

    def training_step(self, x: Tensor) -> dict[str, float]:
        self.train()
        xm = self.to_model_space(x)
        if self.phase == "encoder":
            return self._encoder_step(xm)
        return self._gan_step(xm)

    def _gradient_penalty(self, real: Tensor, fake: Tensor) -> Tensor:
        eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device)
        mix = (eps * real + (1.0 - eps) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(self._critic(mix)[0].sum(), mix, create_graph=True)
        return (grad.flatten(1).norm(dim=1) - 1.0).pow(2).mean()

    def _gan_step(self, x: Tensor) -> dict[str, float]:
        """One critic update; every n_critic-th step also a generator update (its loss is
        reported on those steps only, and averaged over them)."""
        h, opt = self.hparams, self.optimizers
        n, nz = x.shape[0], h["latent_dim"]
        fake = self.gen(torch.randn(n, nz, device=x.device)).detach()
        opt["d"].zero_grad(set_to_none=True)
        real_value, fake_value = self._critic(x)[0].mean(), self._critic(fake)[0].mean()
        gp = self._gradient_penalty(x, fake)
        l_d = fake_value - real_value + h["gp_weight"] * gp
        l_d.backward()
        opt["d"].step()
        losses = {"d": l_d.item(), "wasserstein": (real_value - fake_value).item(), "gp": gp.item()}
        self.critic_steps += 1
        if int(self.critic_steps) % h["n_critic"] == 0:
            opt["g"].zero_grad(set_to_none=True)
            l_g = -self._critic(self.gen(torch.randn(n, nz, device=x.device)))[0].mean()
            l_g.backward()
            opt["g"].step()
            losses["g"] = l_g.item()
        return losses

    def _encoder_step(self, x: Tensor) -> dict[str, float]:
        opt = self.optimizers["e"]
        opt.zero_grad(set_to_none=True)
        loss = self._izi_f(x)[0].mean()
        loss.backward()
        opt.step()
        return {"izi_f": loss.item()}

    def _izi_f(self, xm: Tensor) -> tuple[Tensor, Tensor]:
        """x in model space -> (per-sample izi_f loss, G(E(x)) in model space)."""
        rec = self.gen(self.enc(xm)[0])
        pixel = (xm - rec).pow(2).flatten(1).mean(dim=1)
        feature = (self._critic(xm)[1] - self._critic(rec)[1]).pow(2).mean(dim=1)
        return pixel + self.hparams["kappa"] * feature, rec

    def code(self, x: Tensor) -> Tensor:
        return self.enc(self.to_model_space(x))[0]

    def features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self._encode(self.enc, self.to_model_space(x))[1:]

    def score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xm = self.to_model_space(x)
        if self.knn_scored or self.feature_scored:
            z, features, pooled = self._encode(self.enc, xm)
            score = (
                self.nearest(z) if self.knn_scored else self.feature_score(x, features, pooled)
            )
            return score, self.from_model_space(self.gen(z), x)
        score, rec = self._izi_f(xm)
        return score, self.from_model_space(rec, x)

    def selection_metric(self, x: Tensor) -> Tensor:
        # The izi_f score whatever the score method: the knn score needs fitting first.
        return self._izi_f(self.to_model_space(x))[0]
