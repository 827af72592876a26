"""The GAN anomaly detectors behind one interface (`AnomalyGAN`): build one with
`build_model(arch, spec, **hparams)`. Each model lives in its own module here and registers
itself and its default hyperparameters per input kind (`training/models/registry.py`);
importing this package imports every module in it, so a new model file is found without
being listed anywhere. Why each default is what it is, and how it was measured, is in
benchmarks/notes.md and docs/benchmarks.md."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from gansentry.manifest import ImageInput, TabularInput
from training.models.base import AnomalyGAN
from training.models.registry import architectures, lookup, resolve

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

# The architectures that ship with the package (a model registered later, e.g. by a test,
# is still built by `build_model`; `architectures()` lists it).
ARCHITECTURES = architectures()


def default_hparams(arch: str, spec: ImageInput | TabularInput) -> dict[str, Any]:
    """`arch`'s defaults for `spec`'s input kind, as a fresh dict."""
    return resolve(arch, spec, {})


def build_model(arch: str, spec: ImageInput | TabularInput, **hparams: Any) -> AnomalyGAN:
    """Unknown hyperparameter names and values of the wrong type are rejected naming the
    key, so a typo cannot silently fall back to a default."""
    h = resolve(arch, spec, hparams)
    return lookup(arch).cls(spec, **h)


__all__ = ["ARCHITECTURES", "AnomalyGAN", "architectures", "build_model", "default_hparams"]
