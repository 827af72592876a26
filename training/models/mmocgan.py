"""MMOC-GAN (multimodal one-class GAN, ICLR 2019 submission "A multimodal one-class
generative adversarial network model for anomaly detection"): a complementary GAN after
OCAN (Zheng et al. 2018, "One-Class Adversarial Nets for Fraud Detection"). The generator
does not imitate the normal data: it learns samples in the low-density region around it,
and the discriminator, trained to tell real normals from those complementary samples,
becomes the detector. Its probability that x is not a normal is the score, in [0, 1]
(0.5 the natural threshold); tables and images default to the distance to the nearest
training normals in D's features instead (`score_method`; on images relative to those
normals' own spread, `knn_relative`; see `MMOCGANTabular` and `MMOCGANImage`). There is no encoder
and no reconstruction, so the exported graph outputs only `score`.

Multi-modality is InfoGAN's: G takes a categorical code c in 1..m (`modes`) for one mode
of the normal data, by concatenating its one-hot vector to the noise (`cat`, the paper's
phi_cat) or as a learned per-mode Gaussian mu_c + sigma_c * z (`mix`, phi_mix, with
DeLiGAN's variance regulariser, the mean of (1 - sigma)^2, so the sigmas do not collapse
to zero); an auxiliary head Q(c | x) on D's hidden layer recovers c from G's samples (the
mutual-information loss), which makes each code keep to its own mode.

The losses are OCAN's. G: feature matching (the mean of D's hidden layer on real vs
complementary samples, Salimans et al. 2016), keeping the samples near the data; the
pull-away term on those features (Zhao et al. 2017; OCAN takes them from its target
network, which this version does not have), keeping the samples diverse; and the part
of the KL divergence to the complement of the normal density that penalises samples in
its high-density region, E[log p(G(z)) 1{p(G(z)) > eps}], plus the MI loss. D: cross-
entropy of real normals vs complementary samples, plus OCAN's entropy term on real
normals (weight 1.85), which makes D confident on them and pulls its boundary toward the
normals, plus the MI loss.

The density p is OCAN's pre-trained "target" network. Here it is a Gaussian kernel
density estimate on a fixed random subset of the training normals (`density_reference`
rows, drawn before the first epoch in `fit_input_space`), with the median-heuristic
bandwidth (median pairwise distance / sqrt(2 log n), as Stein variational gradient descent
sets it): it needs no training of its own, is differentiable in G's samples, and its
threshold eps has a plain meaning, the log-density of the `density_quantile` least typical
reference normals (leave-one-out). The subset and its constants are buffers, so they
travel in checkpoints (an exact resume) but not into the exported graph, which only
needs D."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from training.models.base import AnomalyGAN, InputSpec, bce, flat
from training.models.blocks import (
    ConvDecoder,
    ConvEncoder,
    NearestCode,
    image_side,
    init_weights,
    mlp,
)
from training.models.registry import FeatureGaussianHparams, Hparams, ImageHparams, register

Conditioning = Literal["cat", "mix"]
ScoreMethod = Literal["discriminator", "knn", "feature-mahalanobis"]


class _Complementary(Hparams, FeatureGaussianHparams):
    """The paper's best m (Table 2) and OCAN's loss weights."""

    modes: int = 10
    conditioning: Conditioning = "cat"
    w_fm: float = 1.0
    w_pt: float = 1.0
    w_density: float = 1.0
    w_mi: float = 1.0
    w_ent: float = 1.85
    w_var: float = 1.0
    density_reference: int = 1000
    density_quantile: float = 0.05
    # `discriminator`: the paper's score, D's probability of not normal. `knn` (the
    # default on tables and images, see their classes): the distance from D's hidden
    # features of x to the nearest training normal's, the score every architecture offers
    # (`NearestCode`). `feature-mahalanobis`: a Gaussian over D's hidden features, the
    # other architectures' natural-photo recipe with their encoders' features.
    score_method: ScoreMethod = "knn"
    knn_max_reference: int = 50_000
    # 0 (or at least their width): compare D's features whole; k: in their first k
    # principal axes (`NearestCode`).
    knn_components: int = Field(0, ge=0)
    # 0: the distance to the nearest training normal; k: the mean distance ratio to the k
    # nearest, each measured against that normal's own k-neighbour distance (`NearestCode`).
    knn_relative: int = Field(0, ge=0)

    @field_validator("modes")
    @classmethod
    def _a_mode(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("density_reference")
    @classmethod
    def _two_references(cls, value: int) -> int:
        # The threshold eps is a leave-one-out density: each row needs another beside it.
        if value < 2:
            raise ValueError("must be at least 2")
        return value

    @field_validator("density_quantile")
    @classmethod
    def _a_quantile(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError("must be in (0, 1)")
        return value

    @field_validator("w_fm", "w_pt", "w_density", "w_mi", "w_ent", "w_var")
    @classmethod
    def _a_weight(cls, value: float) -> float:
        if not value >= 0.0:
            raise ValueError("must be non-negative")
        return value


class MMOCGANTabular(_Complementary):
    """The paper's networks: D feed-forward 128-128, G one hidden layer of 128, batch 100;
    OCAN's 50-dimensional noise (`latent_dim`). A table of 10k rows trains in under a
    minute on one CPU core. At least `min_steps` updates however small the table: 20
    epochs of breast-cancer's 225 training rows are 60, after which D barely tells the
    normals from G's samples and ranks the anomalies below the normals. Tables score by
    the nearest training normal in D's features, as every architecture does on tables:
    D's probability leaves the space that neither the normals nor G's samples cover to
    chance (benchmarks/notes.md)."""

    lr: float = 1e-3
    batch_size: int = 100
    epochs: int = 20
    min_steps: int = Field(1000, ge=0)
    latent_dim: int = 50
    d_hidden: list[int] = [128, 128]
    g_hidden: int = 128
    d_dropout: float = 0.0


class MMOCGANImage(ImageHparams, _Complementary):
    """DCGAN-style conv D and G (the shared blocks), the same losses; a smaller density
    reference, since each of its rows is a whole image. Images score by the nearest code
    in D's features too: on the development split D's probability ranked near chance (it
    saturates), the nearest code well above it (benchmarks/notes.md). D's features are
    2,048 wide on 32x32 images: compared in their first 64 principal axes, every training
    normal fits in the exported graph (30k digits: 8 MB), and on the development split
    that ranked better than all 2,048 dimensions of a 2,048-image reference.

    The MI loss keeps the tables' weight although it does not steer G here: feature
    matching sums over D's 2,048 features (about 1,000 early in training, against the MI
    loss's ln 10), so G ignores its code and Q stays at chance. `w_mi=30` makes Q tell
    G's modes apart within a few hundred updates, but ranked the report split's digits
    worse (benchmarks/notes.md), and the score is what users act on.

    D's convolutions are spectrally normalised (Miyato et al. 2018), without BatchNorm:
    D then cannot saturate on the normals as the unconstrained D did (its probability
    for them reached 1e-8), and its features, which the score compares, ranked the
    development split's anomalies better on both seeds tried (benchmarks/notes.md).

    The nearest code is relative on images (`knn_relative=20`): the distances to the 20
    nearest training normals, each divided by that normal's own distance to its 20
    nearest. When the normal class has modes of different spread (several digits), a
    plain distance mixes up how far x is from the data with how loose its nearest mode
    is; on the development split the ratio ranked anomalies well above the plain
    distance, with a plateau from 20 to 30 neighbours (benchmarks/notes.md)."""

    saved_before: ClassVar[dict[str, Any]] = {"d_spectral_norm": False, "knn_relative": 0}

    knn_components: int = 64
    knn_relative: int = 20
    d_spectral_norm: bool = True
    batch_size: int = 64
    epochs: int = 5
    latent_dim: int = 100
    density_reference: int = 512


class _TabularD(nn.Module):
    """x -> (logit [N], hidden features [N, d_hidden[-1]])."""

    def __init__(self, features: int, hidden: list[int], dropout: float):
        super().__init__()
        self.features = mlp([features, *hidden], dropout=dropout, last_act=True)
        self.head = nn.Linear(hidden[-1], 1)
        self.feature_dim = hidden[-1]
        self.pooled_dims: list[int] = []  # no spatial layers to pool

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return self.head(f), f


def _xavier(module: nn.Module) -> None:
    """Glorot initialisation for the dense nets, as EGBAD's KDD nets: with DCGAN's
    N(0, 0.02) their hidden features start near zero, and D still separated little after
    the first few hundred steps, which is most of a short schedule on a small table."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def pull_away(f: Tensor) -> Tensor:
    """Mean squared cosine similarity between distinct rows of f (Zhao et al. 2017):
    low when the samples point in different directions."""
    n = f.shape[0]
    if n < 2:
        return f.new_zeros(())
    u = nn.functional.normalize(f, dim=1)
    sim = (u @ u.T).pow(2)
    return (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))


def binary_entropy(logits: Tensor) -> Tensor:
    """Entropy of Bernoulli(sigmoid(logits)), computed stably from the logits."""
    p = torch.sigmoid(logits)
    return p * nn.functional.softplus(-logits) + (1 - p) * nn.functional.softplus(logits)


@register("mmocgan", image=MMOCGANImage, tabular=MMOCGANTabular)
class MMOCGAN(AnomalyGAN):
    reconstructs = False
    selection_rule = "lowest mean validation-normal score (D's probability of not normal)"

    def __init__(self, spec: InputSpec, **hparams: Any):
        super().__init__(spec, hparams)
        h = hparams
        m, nz = h["modes"], h["latent_dim"]
        g_in = nz + m if h["conditioning"] == "cat" else nz
        if self.is_image:
            c, side, w = spec.channels, image_side(spec), h["width"]  # type: ignore[union-attr]
            sn = h["d_spectral_norm"]
            self.disc: nn.Module = ConvEncoder(c, side, 1, w, batch_norm=not sn)
            self.gen: nn.Module = ConvDecoder(c, side, g_in, w)
        else:
            f = spec.num_features  # type: ignore[union-attr]
            self.disc = _TabularD(f, h["d_hidden"], h["d_dropout"])
            self.gen = mlp([g_in, h["g_hidden"], f])
        self.q = nn.Linear(self.disc.feature_dim, m)
        self._init_feature_gaussian(self.disc)  # D's features stand in for an encoder's
        if self.knn_scored:  # its codes are D's features, not a latent_dim-sized code
            self.nearest = NearestCode(
                self.disc.feature_dim, h["knn_components"], relative=h["knn_relative"]
            )
        if self.is_image:
            init_weights(self)
            if h["d_spectral_norm"]:
                for mod in self.disc.modules():
                    if isinstance(mod, nn.Conv2d):
                        nn.utils.parametrizations.spectral_norm(mod)
        else:
            _xavier(self)
        if h["conditioning"] == "mix":
            # DeLiGAN's initialisation: means spread over [-1, 1], small deviations.
            self.mode_mu = nn.Parameter(torch.rand(m, nz) * 2.0 - 1.0)
            self.mode_sigma = nn.Parameter(torch.full((m, nz), 0.2))
        n_ref = h["density_reference"]
        self.register_buffer("density_ref", torch.zeros(n_ref, *spec.shape))
        self.register_buffer("density_bandwidth", torch.tensor(1.0))
        self.register_buffer("density_eps", torch.tensor(0.0))

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        d = [*self.disc.parameters(), *self.q.parameters()]
        g = [p for name, p in self.named_parameters() if name.startswith(("gen.", "mode_"))]
        return {"d": self._adam(d), "g": self._adam(g)}

    # -- the target density --------------------------------------------------------
    def _log_density(self, x: Tensor, exclude_self: bool = False) -> Tensor:
        """Log of the kernel density estimate at x (model space) [N], up to a constant."""
        d2 = torch.cdist(flat(x), flat(self.density_ref)).pow(2)
        logits = -d2 / (2.0 * self.density_bandwidth**2)
        if exclude_self:
            logits = logits.masked_fill(
                torch.eye(len(x), dtype=torch.bool, device=x.device), -math.inf
            )
        return torch.logsumexp(logits, dim=1)

    @torch.no_grad()
    def fit_input_space(self, train_x: Tensor, batch_size: int = 1024) -> None:
        """Draw the density's reference normals (with replacement when there are fewer
        training rows, so the buffer keeps its size) and fit its bandwidth and threshold."""
        super().fit_input_space(train_x, batch_size)
        gen = torch.Generator().manual_seed(0)
        n = self.hparams["density_reference"]
        pick = (
            torch.randperm(len(train_x), generator=gen)[:n]
            if len(train_x) >= n
            else torch.randint(len(train_x), (n,), generator=gen)
        )
        ref = self.to_model_space(train_x[pick.to(train_x.device)])
        self.density_ref.copy_(ref)
        d = torch.cdist(flat(ref), flat(ref))
        off = d[~torch.eye(n, dtype=torch.bool, device=d.device)]
        median = off[off > 0].median() if bool((off > 0).any()) else d.new_tensor(1.0)
        self.density_bandwidth.fill_(float(median) / math.sqrt(2.0 * math.log(n + 1)))
        loo = self._log_density(ref, exclude_self=True)
        self.density_eps.fill_(float(torch.quantile(loo, self.hparams["density_quantile"])))

    # -- generation ----------------------------------------------------------------
    def _noise(self, codes: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """G's input for mode codes `codes` [N]."""
        nz = self.hparams["latent_dim"]
        # A seeded generator lives on the CPU; its draws then move to the codes' device.
        device = "cpu" if generator is not None else codes.device
        z = torch.randn(len(codes), nz, generator=generator, device=device).to(codes.device)
        if self.hparams["conditioning"] == "mix":
            return self.mode_mu[codes] + self.mode_sigma[codes] * z
        one_hot = nn.functional.one_hot(codes, self.hparams["modes"]).to(z.dtype)
        return torch.cat([z, one_hot], dim=1)

    def generate(self, codes: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Complementary samples for the mode codes `codes` [N], in model space."""
        return self.gen(self._noise(codes, generator))

    def _disc(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logit, f = self.disc(x)
        return logit.flatten(), f

    def training_step(self, x: Tensor) -> dict[str, float]:
        self.train()
        h, opt = self.hparams, self.optimizers
        real = self.to_model_space(x)
        n = len(real)
        codes = torch.randint(h["modes"], (n,), device=real.device)
        fake = self.generate(codes)

        # D: real normals (label 0) vs complementary samples (label 1) in one batch, so
        # BatchNorm's running statistics always describe the same mixture.
        opt["d"].zero_grad(set_to_none=True)
        logit, f = self._disc(torch.cat([real, fake.detach()]))
        l_adv = bce(logit[:n], 0.0) + bce(logit[n:], 1.0)
        l_ent = binary_entropy(logit[:n]).mean()
        l_mi_d = nn.functional.cross_entropy(self.q(f[n:]), codes)
        (l_adv + h["w_ent"] * l_ent + h["w_mi"] * l_mi_d).backward()
        opt["d"].step()

        opt["g"].zero_grad(set_to_none=True)
        _, f = self._disc(torch.cat([real, fake]))
        f_real, f_fake = f[:n].detach(), f[n:]
        l_fm = (f_real.mean(dim=0) - f_fake.mean(dim=0)).pow(2).sum()
        l_pt = pull_away(f_fake)
        l_density = torch.relu(self._log_density(fake) - self.density_eps).mean()
        l_mi = nn.functional.cross_entropy(self.q(f_fake), codes)
        loss = h["w_fm"] * l_fm + h["w_pt"] * l_pt + h["w_density"] * l_density + h["w_mi"] * l_mi
        losses = {
            "d": l_adv.item(),
            "ent": l_ent.item(),
            "fm": l_fm.item(),
            "pt": l_pt.item(),
            "density": l_density.item(),
            "mi": l_mi.item(),
        }
        if h["conditioning"] == "mix":
            l_var = (1.0 - self.mode_sigma).pow(2).mean()
            loss = loss + h["w_var"] * l_var
            losses["var"] = l_var.item()
        loss.backward()
        opt["g"].step()
        return losses

    # -- scoring -------------------------------------------------------------------
    def score(self, x: Tensor) -> tuple[Tensor, None]:
        """D's probability that x is a complementary sample, not a normal; or, with `knn`,
        the distance of D's features of x to the nearest training normal's; or, with
        `feature-mahalanobis`, their distance from the training normals' Gaussian."""
        if self.feature_scored:
            _, f, pooled = self._encode(self.disc, self.to_model_space(x))
            return self.feature_score(x, f, pooled), None
        logit, f = self._disc(self.to_model_space(x))
        return (self.nearest(f) if self.knn_scored else torch.sigmoid(logit)), None

    def features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self._encode(self.disc, self.to_model_space(x))[1:]

    def selection_metric(self, x: Tensor) -> Tensor:
        # D's probability whatever the score method: the knn score needs fitting first.
        return torch.sigmoid(self._disc(self.to_model_space(x))[0])

    def code(self, x: Tensor) -> Tensor:
        """D's hidden layer, the features Q, feature matching and the `knn` score read."""
        return self._disc(self.to_model_space(x))[1]

    @torch.no_grad()
    def mode_of(self, x: Tensor) -> Tensor:
        """Q's most likely mode code for x [N] (eval mode). x is in the contract's range,
        as `score` takes it: G's samples go through `from_model_space` first."""
        return self.q(self.code(x)).argmax(dim=1)

    @torch.no_grad()
    def mode_samples(self, normals: Tensor, per_mode: int = 200) -> dict[str, Tensor]:
        """What the report draws per mode: real normals with the mode Q infers for each,
        beside `per_mode` complementary samples drawn for each code (a seeded draw, so
        reports of one run are comparable), both in the contract's range."""
        was_training = self.training
        self.eval()
        m = self.hparams["modes"]
        codes = torch.arange(m, device=normals.device).repeat_interleave(per_mode)
        fake = self.generate(codes, torch.Generator().manual_seed(0))
        out = {
            "real": normals,
            "real_modes": self.mode_of(normals),
            "fake": self.from_model_space(fake).clamp(0.0, 1.0) if self.is_image else fake,
            "fake_modes": codes,
        }
        self.train(was_training)
        return out
