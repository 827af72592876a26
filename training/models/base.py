"""The interface every detector implements, so training, evaluation, ONNX export and the
service all go through one scoring function per model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gansentry.manifest import ImageInput, TabularInput
from training.models.blocks import NearestCode
from training.models.registry import Phase

InputSpec = ImageInput | TabularInput


class AnomalyGAN(nn.Module, ABC):
    """A GAN anomaly detector. Subclasses build their networks in `__init__`, list their
    optimisers in `_make_optimizers` and implement `training_step` and `score`.

    `score` takes inputs in the contract's range (images in [0, 1]) and does any further
    normalisation itself, so the exported graph needs nothing around it. A model whose
    score does not come from reconstructing its input sets `reconstructs = False` and
    returns None in its place; its graph then has no `reconstruction` output (nor anomaly
    maps) and the service answers requests for them with a 422."""

    arch: str = ""  # set by `training.models.registry.register`
    reconstructs: ClassVar[bool] = True
    # Stages trained one after the other, each for its own hyperparameter's epoch count
    # (the hparams class is then a `PhasedHparams` with the same phases). Empty: one stage
    # of `epochs` epochs.
    phases: ClassVar[tuple[Phase, ...]] = ()

    def __init__(self, spec: InputSpec, hparams: dict[str, Any]):
        super().__init__()
        self.spec = spec
        self.hparams = dict(hparams)
        self._optimizers: dict[str, torch.optim.Optimizer] | None = None
        self.phase: str | None = None  # set by `start_phase`
        self._init_contrast_norm()
        if self.knn_scored:
            self.nearest = NearestCode(hparams["latent_dim"])

    @property
    def is_image(self) -> bool:
        return isinstance(self.spec, ImageInput)

    # -- optimisation ------------------------------------------------------------
    @abstractmethod
    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def _adam(self, params: Any) -> torch.optim.Optimizer:
        h = self.hparams
        return torch.optim.Adam(params, lr=h["lr"], betas=(h["beta1"], h["beta2"]))

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Created on first use, after the model has been moved to its device."""
        if self._optimizers is None:
            self._optimizers = self._make_optimizers()
        return self._optimizers

    def training_state(self) -> dict[str, Any]:
        """Everything a checkpoint needs for an exact resume (weights, EMA copies and
        step counters are buffers/parameters, so `state_dict` carries them)."""
        return {
            "model": self.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["model"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])

    def phase_plan(self) -> list[tuple[str, int]]:
        """(phase name, epochs) in training order; empty for a model without phases."""
        return [(p.name, int(self.hparams[p.epochs])) for p in self.phases]

    def start_phase(self, name: str) -> None:
        """Called by the training loop before a phase's first epoch, and again when a run
        resumes inside it. It may only switch what trains (no random draws, no new
        weights), so a resumed run stays identical to an uninterrupted one."""
        if name not in (p.name for p in self.phases):
            raise ValueError(f"{self.arch} has no phase {name!r}")
        self.phase = name

    @abstractmethod
    def training_step(self, x: Tensor) -> dict[str, float]:
        """One minibatch in the contract range: every sub-network update; returns the
        named losses for the progress bar and history."""

    # -- input space ---------------------------------------------------------------
    @property
    def contrast_normalised(self) -> bool:
        return self.is_image and bool(self.hparams.get("contrast_norm", False))

    def _init_contrast_norm(self) -> None:
        """Buffers for the range of contrast-normalised training images, so the fitted
        scaling travels in checkpoints and in the exported graph."""
        if self.contrast_normalised:
            self.register_buffer("gcn_low", torch.tensor(-1.0))
            self.register_buffer("gcn_high", torch.tensor(1.0))

    @staticmethod
    def _contrast(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-image L1 global contrast normalisation (Deep SVDD's CIFAR-10 preprocessing):
        -> (normalised, mean, contrast). Without it, pixel-space models rank busy, high-
        contrast normal classes (cars, trucks) as more anomalous than the flat images of
        other classes."""
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        centred = x - mean
        contrast = centred.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        return centred / contrast, mean, contrast

    @staticmethod
    def image_statistics(x: Tensor) -> Tensor:
        """What contrast normalisation takes away from the networks' view: each channel's
        mean and the log of the image's contrast, [N, C + 1]."""
        _, _, contrast = AnomalyGAN._contrast(x)
        return torch.cat([x.mean(dim=(2, 3)), contrast.flatten(1).log()], dim=1)

    @torch.no_grad()
    def fit_input_space(self, train_x: Tensor, batch_size: int = 1024) -> None:
        """Fit the input scaling on the training normals before the first epoch (min-max of
        the contrast-normalised pixels, as Deep SVDD); a no-op without contrast_norm."""
        if not self.contrast_normalised:
            return
        low, high = float("inf"), float("-inf")
        for i in range(0, len(train_x), batch_size):
            g = self._contrast(train_x[i : i + batch_size])[0]
            low, high = min(low, g.min().item()), max(high, g.max().item())
        self.gcn_low.fill_(low)
        self.gcn_high.fill_(high)

    def to_model_space(self, x: Tensor) -> Tensor:
        """Contract range -> the range the networks work in (tanh outputs for images)."""
        if not self.is_image:
            return x
        if self.contrast_normalised:
            g = self._contrast(x)[0]
            return (g - self.gcn_low) / (self.gcn_high - self.gcn_low) * 2.0 - 1.0
        return x * 2.0 - 1.0

    def from_model_space(self, y: Tensor, like: Tensor | None = None) -> Tensor:
        """Model space -> contract range. With contrast normalisation the reconstruction
        takes back the mean and contrast of `like` (its input); without an input (decoded
        memory units) it is only rescaled for display."""
        if not self.is_image:
            return y
        if not self.contrast_normalised or like is None:
            return (y + 1.0) * 0.5
        _, mean, contrast = self._contrast(like)
        g = (y + 1.0) * 0.5 * (self.gcn_high - self.gcn_low) + self.gcn_low
        return (g * contrast + mean).clamp(0.0, 1.0)

    # -- scoring -------------------------------------------------------------------

    @abstractmethod
    def score(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """x in the contract range -> (score [N] float32, higher = more anomalous;
        reconstruction with x's shape and range, None if the model does not reconstruct).
        Call in eval mode."""

    @abstractmethod
    def code(self, x: Tensor) -> Tensor:
        """x in the contract range -> the latent code [N, latent_dim] that the `knn` score
        compares with the training normals' codes (eval mode)."""

    def features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x in the contract range -> what the `feature-mahalanobis` score models (eval
        mode): the encoder's last hidden features [N, d] and its pooled layers (`_encode`).
        Only models that offer that score method implement it."""
        raise NotImplementedError(f"{self.arch} has no feature-mahalanobis score")

    def _encode(self, encoder: nn.Module, xm: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """One pass of `encoder` (a `ConvEncoder` or `MlpEncoder`) over model-space inputs
        -> (code, last hidden features, pooled layers); the pooled layers only when the
        feature score reads them, so no other graph computes them."""
        if self.pooled_layers:
            return encoder.forward_layers(xm)
        z, f = encoder(xm)
        return z, f, []

    @property
    def knn_scored(self) -> bool:
        return self.hparams.get("score_method") == "knn"

    @property
    def feature_scored(self) -> bool:
        return self.hparams.get("score_method") == "feature-mahalanobis"

    pooled_layers: int = 0  # how many pooled encoder layers the feature score models

    def _init_feature_gaussian(self, encoder: nn.Module) -> None:
        """Buffers of the `feature-mahalanobis` score, for models that offer it: call once
        `encoder`, whose features it models, exists. They travel in checkpoints and in the
        exported graph (a MatMul per Gaussian)."""
        if not self.feature_scored:
            return
        self.register_buffer("feature_mean", torch.zeros(encoder.feature_dim))
        self.register_buffer("feature_whitening", torch.eye(encoder.feature_dim))
        if self.hparams["feature_layers"] == "all":
            self.pooled_layers = len(encoder.pooled_dims)
        for i, dim in enumerate(encoder.pooled_dims[: self.pooled_layers]):
            self.register_buffer(f"pooled_mean_{i}", torch.zeros(dim))
            self.register_buffer(f"pooled_whitening_{i}", torch.eye(dim))
        if self.contrast_normalised:
            channels = self.spec.channels  # type: ignore[union-attr]
            self.register_buffer("stats_mean", torch.zeros(channels + 1))
            self.register_buffer("stats_whitening", torch.eye(channels + 1))

    def feature_score(self, x: Tensor, features: Tensor, pooled: list[Tensor]) -> Tensor:
        """`feature-mahalanobis` (the CIFAR-10 recipe, with contrast_norm): the squared
        whitened distance of the encoder's features from their training-normal Gaussian,
        per dimension. With contrast normalisation, plus the same for the image statistics
        it removed (channel means, log contrast), so exposure and colour cast still count,
        weighted like the features rather than drowned by their dimensions; with
        `feature_layers=all`, plus the same for each pooled encoder layer."""
        score = ((features - self.feature_mean) @ self.feature_whitening).pow(2).mean(dim=1)
        for i in range(self.pooled_layers):
            mean, whitening = self._pooled_gaussian(i)
            score = score + ((pooled[i] - mean) @ whitening).pow(2).mean(dim=1)
        if self.contrast_normalised:
            s = (self.image_statistics(x) - self.stats_mean) @ self.stats_whitening
            score = score + s.pow(2).mean(dim=1)
        return score

    @torch.no_grad()
    def fit_score(self, train_x: Tensor, batch_size: int = 512) -> bool:
        """Fit whatever the score needs from the training normals, once the checkpoint is
        chosen and before the threshold is calibrated; True if anything was fitted. The
        `knn` score encodes the distinct training normals (`NearestCode`), the
        `feature-mahalanobis` score fits its Gaussians; most other scores need nothing."""
        if not (self.knn_scored or self.feature_scored):
            return False
        was_training = self.training
        self.eval()
        if self.knn_scored:
            self.nearest.fit(train_x, self.code, self.hparams["knn_max_reference"])
        else:
            batches = range(0, len(train_x), batch_size)
            parts = [self.features(train_x[i : i + batch_size]) for i in batches]
            shrinkage = self.hparams["feature_shrinkage"]
            feats = torch.cat([f for f, _ in parts])
            fit_gaussian(feats, shrinkage, self.feature_mean, self.feature_whitening)
            for layer in range(self.pooled_layers):
                pooled = torch.cat([p[layer] for _, p in parts])
                fit_gaussian(pooled, shrinkage, *self._pooled_gaussian(layer))
            if self.contrast_normalised:
                stats = self.image_statistics(train_x)
                fit_gaussian(stats, shrinkage, self.stats_mean, self.stats_whitening)
        self.train(was_training)
        return True

    def _pooled_gaussian(self, layer: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"pooled_mean_{layer}"), getattr(self, f"pooled_whitening_{layer}")

    @property
    def score_is_fitted(self) -> bool:
        """True if `score` depends on `fit_score`: before it, the score means nothing (or
        cannot be computed), so training does not log it per epoch."""
        return self.knn_scored or self.feature_scored

    def selection_metric(self, x: Tensor) -> Tensor:
        """Per-sample label-free quantity on validation normals; the epoch with the lowest
        mean is selected. Defaults to the score itself."""
        return self.score(x)[0]

    selection_rule: str = "lowest mean validation-normal score"

    def scorer(self) -> nn.Module:
        """A detached eval-mode copy whose forward is `score`, for ONNX export."""
        copy = type(self)(self.spec, **self.hparams)
        copy.load_state_dict(self.state_dict())
        return _Scorer(copy).eval()

    def visuals(self) -> dict[str, Tensor]:
        return {}


class _Scorer(nn.Module):
    def __init__(self, model: AnomalyGAN):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """The graph's outputs in contract order: score, then reconstruction if any."""
        score, recon = self.model.score(x)
        return (score,) if recon is None else (score, recon)


def bce(logits: Tensor, target: float) -> Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def flat(t: Tensor) -> Tensor:
    return t.flatten(1)


def fit_gaussian(samples: Tensor, shrinkage: float, mean: Tensor, whitening: Tensor) -> None:
    """Fill `mean` and `whitening` (W with W^T cov W = I) in place. The covariance is shrunk
    towards its mean variance, so directions the normals never vary in do not dominate."""
    x = samples.double()
    mu = x.mean(dim=0)
    eigvals, eigvecs = torch.linalg.eigh(torch.cov((x - mu).t()))
    eigvals = eigvals.clamp_min(0)
    mean.copy_(mu.float())
    whitening.copy_((eigvecs / (eigvals + shrinkage * eigvals.mean()).sqrt()).float())
