"""EGBAD (Zenati et al. 2018): a BiGAN whose encoder gives x's latent code; the score
mixes the reconstruction error of G(E(x)) with a discriminator term (feature matching or
cross-entropy), computed with exponential-moving-average weights as in the paper. The
`latent` score instead measures how far E moves x's code on the way round,
||E(x) - E(G(E(x)))||^2 (GANomaly's score, with EGBAD's own encoder). The `knn` score is
the distance from E(x) to the nearest code of a training normal (Bergman et al. 2020,
"Deep Nearest Neighbor Anomaly Detection", on the BiGAN's encoder): the codes are fitted
after checkpoint selection and travel inside the ONNX graph."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from training.models.base import AnomalyGAN, InputSpec, bce
from training.models.bigan import build_bigan
from training.models.blocks import init_weights

SCORE_METHODS = ("fm", "cross-e", "latent", "knn")


def _build(spec: InputSpec, h: dict[str, Any]) -> tuple[nn.Module, nn.Module, nn.Module]:
    enc, gen, disc = build_bigan(spec, h)
    for m in (*enc.modules(), *gen.modules(), *disc.modules()):
        if isinstance(m, nn.LeakyReLU):
            m.negative_slope = h["leaky_slope"]
    if spec.kind == "tabular":
        # Features are min-max scaled to [0, 1] and mostly one-hot: a linear output can
        # never match them exactly, so the discriminator wins within an epoch and
        # G(E(x)) stays meaningless (measured: KDD F1 near 0, ranking inverted).
        gen = nn.Sequential(gen, nn.Sigmoid())
    return enc, gen, disc


def _xavier(module: nn.Module) -> None:
    """The reference KDD networks use Glorot initialisation: with N(0, 0.02) the small
    dense nets start with near-constant outputs and barely move at lr 1e-5."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class EGBAD(AnomalyGAN):
    arch = "egbad"
    selection_rule = "lowest mean validation-normal L1 reconstruction error (EMA weights)"

    def __init__(self, spec: InputSpec, **hparams: Any):
        super().__init__(spec, hparams)
        if hparams["score_method"] not in SCORE_METHODS:
            raise ValueError(
                f"score_method must be one of {', '.join(SCORE_METHODS)}, "
                f"got {hparams['score_method']!r}"
            )
        self.enc, self.gen, self.disc = _build(spec, hparams)
        init_weights(self)
        if spec.kind == "tabular":
            _xavier(self)
        # Scoring copies, updated as an EMA of the trained weights.
        self.ema_enc, self.ema_gen, self.ema_disc = _build(spec, hparams)
        for live, ema in self._pairs():
            ema.load_state_dict(live.state_dict())
            ema.requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        # Filled by fit_score; its length is the reference set's, so loading resizes it.
        self.register_buffer("knn_codes", torch.zeros(0, hparams["latent_dim"]))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        codes = state_dict.get(prefix + "knn_codes")
        if codes is not None:
            self.knn_codes = torch.empty_like(codes, device=self.knn_codes.device)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.enc, self.ema_enc), (self.gen, self.ema_gen), (self.disc, self.ema_disc)]

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        ge = [*self.enc.parameters(), *self.gen.parameters()]
        d = self._adam(self.disc.parameters())
        # A slower discriminator keeps the BiGAN from collapsing after a few epochs.
        for group in d.param_groups:
            group["lr"] *= self.hparams["d_lr_scale"]
        return {"ge": self._adam(ge), "d": d}

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Warm-up as in TensorFlow's ExponentialMovingAverage(num_updates=...): short
        # schedules would otherwise score with weights still close to the initial ones.
        n = int(self.ema_updates)
        decay = min(self.hparams["ema_decay"], (1 + n) / (10 + n))
        for live, ema in self._pairs():
            torch._foreach_lerp_(list(ema.parameters()), list(live.parameters()), 1.0 - decay)
            for b_ema, b in zip(ema.buffers(), live.buffers(), strict=True):
                b_ema.copy_(b)
        self.ema_updates += 1

    def training_step(self, x: Tensor) -> dict[str, float]:
        self.train()
        opt = self.optimizers
        x = self.to_model_space(x)
        z = torch.randn(x.shape[0], self.hparams["latent_dim"], device=x.device)

        opt["d"].zero_grad(set_to_none=True)
        z_real = self.enc(x)[0]
        x_fake = self.gen(z)
        l_d = bce(self.disc(x, z_real.detach())[0], 1.0) + bce(
            self.disc(x_fake.detach(), z)[0], 0.0
        )
        l_d.backward()
        opt["d"].step()

        # BiGAN's inverted labels: E makes (x, E(x)) look fake, G makes (G(z), z) look real.
        opt["ge"].zero_grad(set_to_none=True)
        l_e = bce(self.disc(x, z_real)[0], 0.0)
        l_g = bce(self.disc(x_fake, z)[0], 1.0)
        loss = l_e + l_g
        losses = {"d": l_d.item(), "g": l_g.item(), "e": l_e.item()}
        if self.hparams["w_rec"]:
            # Not in the paper: a pure BiGAN only inverts G by accident, and on KDD it
            # drops whole attack modes from G(E(x)) (see the tabular defaults' comment).
            l_rec = (x - self.gen(z_real)).abs().mean()
            loss = loss + self.hparams["w_rec"] * l_rec
            losses["rec"] = l_rec.item()
        loss.backward()
        opt["ge"].step()
        self._update_ema()
        return losses

    def _reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.ema_enc(x)[0]
        return z, self.ema_gen(z)

    @property
    def score_is_fitted(self) -> bool:
        return self.hparams["score_method"] == "knn"

    @torch.no_grad()
    def fit_score(self, train_x: Tensor, batch_size: int = 4096) -> bool:
        """knn: encode the distinct training normals (at most `knn_max_reference`, a fixed
        random subset beyond that). Deduplicating first matters on KDD, where 178k training
        rows hold 33k distinct records: every distinct record, rare attack types included,
        gets its own code, so rare but normal records are not flagged for being rare."""
        if not self.score_is_fitted:
            return False
        rows = torch.unique(train_x.flatten(1), dim=0).reshape(-1, *train_x.shape[1:])
        limit = self.hparams["knn_max_reference"]
        if len(rows) > limit:
            gen = torch.Generator().manual_seed(0)
            rows = rows[torch.randperm(len(rows), generator=gen)[:limit].to(rows.device)]
        was_training = self.training
        self.eval()
        self.knn_codes = torch.cat(
            [
                self.ema_enc(self.to_model_space(rows[i : i + batch_size]))[0]
                for i in range(0, len(rows), batch_size)
            ]
        )
        self.train(was_training)
        return True

    def _nearest_code_distance(self, z: Tensor) -> Tensor:
        if len(self.knn_codes) == 0:
            raise RuntimeError("score_method 'knn' needs fit_score(training normals) first")
        ref = self.knn_codes
        d2 = z.pow(2).sum(1, keepdim=True) - 2.0 * z @ ref.T + ref.pow(2).sum(1)
        # The expansion cancels catastrophically near 0 (a training row's own code), where
        # PyTorch and ONNX Runtime then disagree: it only picks the neighbour.
        nearest = ref[d2.argmin(dim=1)]
        return (z - nearest).pow(2).sum(dim=1).sqrt()

    def score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w = self.hparams["score_weight"]
        xm = self.to_model_space(x)
        z, x_rec = self._reconstruct(xm)
        if self.hparams["score_method"] == "knn":
            return self._nearest_code_distance(z), self.from_model_space(x_rec, x)
        if self.hparams["score_method"] == "latent":
            # On KDD the data-space error is mostly one-hot mismatches, which rare attack
            # types share with normal traffic; the code's round trip tells them apart.
            cycle = (z - self.ema_enc(x_rec)[0]).pow(2).sum(dim=1)
            return cycle, self.from_model_space(x_rec, x)
        rec = (xm - x_rec).abs().flatten(1).sum(dim=1)
        logit, f_real = self.ema_disc(xm, z)
        if self.hparams["score_method"] == "cross-e":
            # The paper's sigma(D(x, E(x)), 1): how fake D finds the real pair.
            dis = nn.functional.softplus(-logit)
        else:
            dis = (f_real - self.ema_disc(x_rec, z)[1]).abs().sum(dim=1)
        return (1.0 - w) * rec + w * dis, self.from_model_space(x_rec, x)

    def selection_metric(self, x: Tensor) -> Tensor:
        xm = self.to_model_space(x)
        return (xm - self._reconstruct(xm)[1]).abs().flatten(1).mean(dim=1)
