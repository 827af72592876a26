"""Networks shared by the two BiGAN-style detectors (EGBAD and MEMGAN): encoder E,
generator G and joint discriminator D(x, z), sized from the papers' MNIST and KDD99
architectures (DCGAN blocks for images)."""

from __future__ import annotations

from typing import Any

from torch import nn

from gansentry.manifest import ImageInput
from training.models.base import InputSpec
from training.models.blocks import (
    ConvDecoder,
    ConvEncoder,
    JointDiscriminator,
    MlpEncoder,
    image_side,
    mlp,
)


def build_bigan(spec: InputSpec, h: dict[str, Any]) -> tuple[nn.Module, nn.Module, nn.Module]:
    """-> (encoder x -> (z, features), generator z -> x, discriminator (x, z) -> (logit, f))."""
    nz = h["latent_dim"]
    if isinstance(spec, ImageInput):
        c, side, w = spec.channels, image_side(spec), h["width"]
        enc = ConvEncoder(c, side, nz, w)
        gen = ConvDecoder(c, side, nz, w)
        x_branch = ConvEncoder(c, side, h["d_x_hidden"], w, dropout=h["d_dropout"])
        disc = JointDiscriminator(
            x_branch, h["d_x_hidden"], nz, h["d_z_hidden"], h["d_joint_hidden"], h["d_dropout"]
        )
    else:
        f = spec.num_features
        enc = MlpEncoder([f, *h["enc_hidden"], nz])
        gen = mlp([nz, *h["gen_hidden"], f], act=nn.ReLU)
        x_branch = mlp([f, h["d_x_hidden"]], dropout=h["d_dropout"], last_act=True)
        disc = JointDiscriminator(
            x_branch, h["d_x_hidden"], nz, h["d_z_hidden"], h["d_joint_hidden"], h["d_dropout"]
        )
    return enc, gen, disc
