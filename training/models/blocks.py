"""Network building blocks shared by the three detectors: DCGAN-style convolutional
encoders/decoders sized for any square image whose side is a multiple of 4, small MLPs
for tabular vectors, the joint (x, z) discriminator of BiGAN-style models, and the
nearest-code score all three detectors can use on tables."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from gansentry.manifest import ImageInput

MIN_SIDE, MAX_SIDE = 16, 256


def image_side(spec: ImageInput) -> int:
    """The conv nets halve the side until it is odd or 4; they need at least two halvings
    so the decoder can mirror the encoder exactly."""
    if spec.height != spec.width:
        raise ValueError(
            f"images must be square for the convolutional models, got {spec.height}x{spec.width}"
        )
    side = spec.height
    if side % 4 or not MIN_SIDE <= side <= MAX_SIDE:
        raise ValueError(
            f"image side {side} is unsupported: it must be a multiple of 4 between "
            f"{MIN_SIDE} and {MAX_SIDE} (e.g. 28, 32 or 64)"
        )
    return side


def _pyramid(side: int) -> tuple[int, int]:
    """(number of stride-2 convolutions, final spatial side)."""
    n, s = 1, side // 2
    while s > 4 and s % 2 == 0:
        n, s = n + 1, s // 2
    return n, s


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation N(0, 0.02), as GANomaly, EGBAD and DCGAN prescribe."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class ConvEncoder(nn.Module):
    """x [N, C, S, S] -> ([N, out_dim], last hidden features flattened). Without
    `batch_norm` (a WGAN-GP critic, whose gradient penalty needs each sample's output to
    depend on that sample only) the convolutions carry biases instead."""

    def __init__(
        self,
        channels: int,
        side: int,
        out_dim: int,
        width: int,
        dropout: float = 0.0,
        batch_norm: bool = True,
    ):
        super().__init__()
        n, final = _pyramid(side)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1, bias=not batch_norm)]
        layers += [nn.LeakyReLU(0.2, inplace=True)]
        w = width
        for _ in range(n - 1):
            layers.append(nn.Conv2d(w, w * 2, 4, 2, 1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(w * 2))
            layers += [nn.LeakyReLU(0.2, inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            w *= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(w, out_dim, final, 1, 0, bias=False)
        self.feature_dim = w * final * final
        # The channels of each convolution's activation, as `forward_layers` pools them.
        self.pooled_dims = [width * 2**i for i in range(n)]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return self.head(f).flatten(1), f.flatten(1)

    def forward_layers(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """`forward`'s outputs, plus each convolution's activation averaged over space
        ([N, pooled_dims[i]]), from the same pass."""
        pooled = []
        h = x
        for m in self.features:
            h = m(h)
            if isinstance(m, nn.LeakyReLU):
                pooled.append(h.mean(dim=(2, 3)))
        return self.head(h).flatten(1), h.flatten(1), pooled


class ConvDecoder(nn.Module):
    """z [N, in_dim] -> image [N, C, S, S] in [-1, 1]; the mirror of `ConvEncoder`."""

    def __init__(self, channels: int, side: int, in_dim: int, width: int):
        super().__init__()
        n, final = _pyramid(side)
        w = width * 2 ** (n - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(in_dim, w, final, 1, 0, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(True),
        ]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(w, w // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(w // 2)]
            layers.append(nn.ReLU(True))
            w //= 2
        layers += [nn.ConvTranspose2d(w, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z[:, :, None, None])


def mlp(
    sizes: list[int],
    act: type[nn.Module] = nn.LeakyReLU,
    dropout: float = 0.0,
    last_act: bool = False,
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_act:
            layers.append(nn.LeakyReLU(0.2, inplace=True) if act is nn.LeakyReLU else act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MlpEncoder(nn.Module):
    """Tabular counterpart of `ConvEncoder`: returns (output, last hidden features)."""

    def __init__(self, sizes: list[int], dropout: float = 0.0):
        super().__init__()
        self.features = mlp(sizes[:-1], dropout=dropout, last_act=True)
        self.head = nn.Linear(sizes[-2], sizes[-1])
        self.feature_dim = sizes[-2]
        self.pooled_dims: list[int] = []  # no spatial layers to pool

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return self.head(f), f

    def forward_layers(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        return (*self(x), [])


class JointDiscriminator(nn.Module):
    """BiGAN discriminator D(x, z): an x branch and a z branch joined into one hidden
    layer, which doubles as the feature-matching layer for EGBAD's score."""

    def __init__(
        self,
        x_branch: nn.Module,
        x_dim: int,
        z_dim: int,
        z_hidden: int,
        joint_hidden: int,
        dropout: float,
    ):
        super().__init__()
        self.x_branch = x_branch
        self.z_branch = mlp([z_dim, z_hidden], dropout=dropout, last_act=True)
        self.joint = mlp([x_dim + z_hidden, joint_hidden], dropout=dropout, last_act=True)
        self.logit = nn.Linear(joint_hidden, 1)

    def forward(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        hx = self.x_branch(x)
        if isinstance(hx, tuple):
            hx = nn.functional.leaky_relu(hx[0], 0.2)
        f = self.joint(torch.cat([hx, self.z_branch(z)], dim=1))
        return self.logit(f).squeeze(1), f


class NearestCode(nn.Module):
    """Distance from a code to the nearest code of a reference set (the distinct training
    normals, encoded once the checkpoint is chosen): Bergman et al. 2020, "Deep Nearest
    Neighbor Anomaly Detection", on a GAN's encoder. Every architecture's `knn` score uses
    this one block; the reference codes are a buffer, so they travel in checkpoints and in
    the exported ONNX graph (MatMul, TopK, Gather).

    The search must pick the same distance in PyTorch and in ONNX Runtime. Ranking by the
    expansion |z|^2 - 2 z.r + |r|^2 costs one matrix product, but it cancels
    catastrophically near 0 (an input equal to a training row) and near ties its rounding
    depends on the matrix product's summation order, so the two runtimes can rank different
    neighbours first. So the expansion only shortlists `CANDIDATES` neighbours, on codes
    centred on the reference mean (which shrinks the norms the error scales with), and the
    score is the minimum of the shortlist's exact distances ||z - r||: a near-tie then
    changes which candidate attains the minimum, not its value."""

    CANDIDATES = 8

    def __init__(self, dim: int, components: int = 0, relative: int = 0):
        """`components` (0 < components < dim): compare codes in the span of the reference
        codes' first principal axes, fitted on the reference codes. For wide codes: the
        graph then holds a [dim, components] basis and every training normal at
        `components` floats, where the full codes would cost `dim` floats each.

        `relative` (k > 0): the score is the mean, over the k nearest reference codes, of
        the distance to each divided by that reference's own mean distance to its k
        nearest other references (its `radius`, fitted with the codes): a local density
        ratio in the manner of LOF (Breunig et al. 2000). Where the normals form modes of
        different spread, a plain distance calls a point beside a tight mode normal and a
        normal point in a loose mode far; the ratio measures both against their mode. The
        k nearest are chosen by exact distance from a shortlist of k + 7, as above; a
        near-tie for the k-th place may let the two runtimes average different references,
        equally far (d), so the score then differs by one term of the mean, d (1/r_a -
        1/r_b) / k, not more."""
        super().__init__()
        self.components = components if 0 < components < dim else 0
        self.relative = relative
        self.register_buffer("centre", torch.zeros(dim))
        if self.components:
            self.register_buffer("basis", torch.zeros(dim, self.components))
        # Its length is the reference set's, so loading a state dict resizes it.
        self.register_buffer("codes", torch.zeros(0, self.components or dim))
        if self.relative:
            self.register_buffer("radius", torch.zeros(0))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        codes = state_dict.get(prefix + "codes")
        if codes is not None:
            self.codes = torch.empty_like(codes, device=self.codes.device)
            if self.relative:
                if len(codes) == 0:  # an unfitted checkpoint: the radii come with the fit
                    state_dict.setdefault(prefix + "radius", torch.zeros(0))
                self.radius = torch.empty(len(codes), device=self.codes.device)
            if self.components and len(codes) == 0 and prefix + "basis" not in state_dict:
                # A checkpoint taken before the reference was fitted (every training
                # checkpoint) holds nothing to project: it resumes whatever the projection.
                state_dict[prefix + "basis"] = torch.zeros_like(self.basis)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]

    @property
    def fitted(self) -> bool:
        return len(self.codes) > 0

    @torch.no_grad()
    def fit(
        self,
        rows: Tensor,
        encode: Callable[[Tensor], Tensor],
        max_reference: int,
        batch_size: int = 4096,
    ) -> None:
        """Encode the distinct `rows` (at most `max_reference`, a fixed random subset beyond
        that). Deduplicating first matters on tables with repeated records (KDD's 178k
        training rows hold 33k distinct ones): each distinct record, rare kinds included,
        gets its own code, so rare but normal records are not flagged for being rare."""
        distinct = torch.unique(rows.flatten(1), dim=0).reshape(-1, *rows.shape[1:])
        if len(distinct) > max_reference:
            gen = torch.Generator().manual_seed(0)
            keep = torch.randperm(len(distinct), generator=gen)[:max_reference]
            distinct = distinct[keep.to(distinct.device)]
        codes = torch.cat(
            [encode(distinct[i : i + batch_size]) for i in range(0, len(distinct), batch_size)]
        ).float()
        self.centre = codes.mean(dim=0)
        centred = codes - self.centre
        if self.components:
            # Principal axes: eigenvectors of the covariance, largest eigenvalues first
            # (in float64: the covariance of wide float32 codes is ill-conditioned).
            cov = centred.double().T @ centred.double() / max(len(centred) - 1, 1)
            axes = torch.linalg.eigh(cov).eigenvectors[:, -self.components :].flip(1)
            self.basis = axes.float().contiguous()
            centred = centred @ self.basis
        self.codes = centred
        if self.relative:
            self.radius = self._radius(centred, batch_size)

    def _radius(self, ref: Tensor, batch_size: int) -> Tensor:
        """Each reference code's mean exact distance to its `relative` nearest others."""
        k = min(self.relative, len(ref) - 1)
        if k < 1:  # a single reference: nothing to measure it against
            return torch.ones(len(ref), device=ref.device)
        out = []
        step = min(batch_size, 1024)  # a [step, references] product at a time
        for i in range(0, len(ref), step):
            d = self._nearest(ref[i : i + step], ref, k + 1)
            # Its own code is among the k + 1 nearest: the first, or tied at distance 0.
            out.append(d[:, 1:].mean(dim=1))
        # A reference with k duplicates would divide by 0: floor at the smallest positive.
        radius = torch.cat(out)
        positive = radius[radius > 0]
        return radius.clamp_min(float(positive.min()) if len(positive) else 1.0)

    def _nearest(self, zc: Tensor, ref: Tensor, k: int) -> Tensor:
        """Exact distances to the k nearest of `ref`, ascending [N, k] (see the class)."""
        return self._nearest_indexed(zc, ref, k)[0]

    def _nearest_indexed(self, zc: Tensor, ref: Tensor, k: int) -> tuple[Tensor, Tensor]:
        # |r|^2 - 2 z.r ranks the references as ||z - r||^2 does (|z|^2 is the same for
        # every r), in one fused product.
        rank = torch.addmm(ref.pow(2).sum(1), zc, ref.T, alpha=-2.0)
        shortlist = rank.topk(min(k + self.CANDIDATES - 1, len(ref)), dim=1, largest=False)
        exact = (zc[:, None, :] - ref[shortlist.indices]).pow(2).sum(dim=2)
        best = exact.topk(min(k, exact.shape[1]), dim=1, largest=False)
        return best.values.sqrt(), shortlist.indices.gather(1, best.indices)

    def forward(self, z: Tensor) -> Tensor:
        """z [N, dim] -> distance to the nearest reference code [N] (with `relative`: the
        mean distance ratio to the k nearest)."""
        if not self.fitted:
            raise RuntimeError("score_method 'knn' needs fit_score(training normals) first")
        zc, ref = z - self.centre, self.codes
        if self.components:
            zc = zc @ self.basis
        if not self.relative:
            return self._nearest(zc, ref, 1)[:, 0]
        dist, index = self._nearest_indexed(zc, ref, self.relative)
        return (dist / self.radius[index]).mean(dim=1)
