"""Where detectors register themselves, so adding one is one file in `training/models/`.

A model file declares its typed default hyperparameters per input kind (a `Hparams`
subclass each) beside its class and registers both with `@register(name, image=...,
tabular=...)`. `training.models` imports every module of the package, so everything that
lists architectures (the training CLI, `build_model`, the generic model tests) sees it
without being edited. Validation goes through the declared class: an unknown
hyperparameter or a value of the wrong type is refused naming the key, so a typo cannot
silently fall back to a default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    field_validator,
    model_validator,
)

from gansentry.manifest import ARCHITECTURE_PATTERN, ImageInput, TabularInput

if TYPE_CHECKING:
    from training.models.base import AnomalyGAN

InputKind = Literal["image", "tabular"]  # the manifest's `input.kind`


class Hparams(BaseModel):
    """What the training loop itself reads; a model's defaults subclass it. Adam's betas
    are the DCGAN settings every paper here uses."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    # Fields added to a model after runs of it were saved, with the value those runs
    # trained with: a finished run records every hyperparameter it used, and one saved
    # before a field existed must load as it trained, not with the field's new default.
    saved_before: ClassVar[dict[str, Any]] = {}

    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    batch_size: int
    epochs: int
    latent_dim: int

    # Validators, not Field constraints: a subclass that redeclares a field to change its
    # default would drop the constraint, and keeps the validator.
    @field_validator("batch_size", "epochs", "latent_dim")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("lr")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be positive")
        return value


class FeatureGaussianHparams(BaseModel):
    """The settings of the `feature-mahalanobis` score (`AnomalyGAN.feature_score`), mixed
    into the defaults of the models that offer it: how far each Gaussian's covariance is
    shrunk towards its mean variance, and which encoder layers it models: `last`, the last
    hidden layer; `all`, also each convolutional layer's channel means (one Gaussian per
    layer, as Rippel et al. 2020 do on pretrained features), so low-level texture and colour
    count as well as the last layer's shapes. Tabular encoders have only the last layer."""

    feature_shrinkage: float = 1e-3
    feature_layers: Literal["last", "all"] = "last"


class ImageHparams(Hparams):
    """What every image model shares: the conv nets' base width and the optional per-image
    contrast normalisation (`AnomalyGAN.to_model_space`). contrast_norm stays off by
    default: it is the recipe for natural photos (CIFAR-10), while MNIST-like data and
    brightness defects need the raw pixels' brightness."""

    width: int = 32
    contrast_norm: bool = False


@dataclass(frozen=True)
class Phase:
    """One stage of a model that trains in stages (f-AnoGAN: the GAN, then the encoder):
    its name, which the model's `training_step` dispatches on, and the hyperparameter that
    holds its epoch count."""

    name: str
    epochs: str


class PhasedHparams(Hparams):
    """Defaults of a model that trains in `phases`, one after the other. `epochs` is their
    total: left out, it is the sum of the phases' counts; given (`--epochs`), the phases
    are scaled to it in proportion to their counts, each keeping at least one epoch, so one
    number still sets the length of any model's run."""

    phases: ClassVar[tuple[Phase, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _total_epochs(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "epochs" in data:
            return data
        try:
            counts = [
                int(data.get(p.epochs, cls.model_fields[p.epochs].default)) for p in cls.phases
            ]
        except (TypeError, ValueError):
            # A placeholder total: the phase's own field then reports its bad value.
            counts = [1 for _ in cls.phases]
        return {**data, "epochs": sum(counts)}

    @field_validator("epochs")
    @classmethod
    def _one_per_phase(cls, value: int) -> int:
        if value < len(cls.phases):
            names = ", ".join(p.name for p in cls.phases)
            raise ValueError(
                f"must be at least {len(cls.phases)}: it trains in {len(cls.phases)} phases "
                f"({names}) of at least one epoch each"
            )
        return value

    @model_validator(mode="after")
    def _split_epochs(self) -> PhasedHparams:
        counts = [getattr(self, p.epochs) for p in self.phases]
        if self.epochs != sum(counts):
            for phase, n in zip(self.phases, split_epochs(self.epochs, counts), strict=True):
                setattr(self, phase.epochs, n)
        return self


def split_epochs(total: int, weights: list[int]) -> list[int]:
    """`total` epochs (at least one per weight) shared in proportion to `weights` by largest
    remainder, each share at least one."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [max(1, int(s)) for s in shares]
    while sum(counts) < total:
        i = max(range(len(counts)), key=lambda k: shares[k] - counts[k])
        counts[i] += 1
    while sum(counts) > total:
        i = max(
            (k for k in range(len(counts)) if counts[k] > 1), key=lambda k: counts[k] - shares[k]
        )
        counts[i] -= 1
    return counts


@dataclass(frozen=True)
class Registered:
    name: str
    cls: type[AnomalyGAN]
    hparams: dict[InputKind, type[Hparams]]


_MODELS: dict[str, Registered] = {}

M = TypeVar("M", bound="type[AnomalyGAN]")  # the decorated class, returned unchanged


def register(
    name: str, *, image: type[Hparams] | None = None, tabular: type[Hparams] | None = None
) -> Callable[[M], M]:
    """Class decorator: serve `cls` as architecture `name` (the manifest's `architecture`)
    for the input kinds given defaults here; a kind without defaults is refused."""
    if not re.fullmatch(ARCHITECTURE_PATTERN, name):
        raise ValueError(f"architecture name {name!r} must match {ARCHITECTURE_PATTERN}")
    given: dict[InputKind, type[Hparams] | None] = {"image": image, "tabular": tabular}
    kinds = {k: v for k, v in given.items() if v is not None}
    if not kinds:
        raise ValueError(f"architecture {name!r} needs defaults for at least one input kind")

    def decorate(cls: M) -> M:
        if name in _MODELS and _MODELS[name].cls is not cls:
            raise ValueError(f"architecture {name!r} is already registered by {_MODELS[name].cls}")
        cls.arch = name
        _MODELS[name] = Registered(name, cls, kinds)
        return cls

    return decorate


def unregister(name: str) -> None:
    """Forget a registration (tests register throwaway models for the length of a test)."""
    _MODELS.pop(name, None)


def architectures() -> tuple[str, ...]:
    """Every registered architecture, in the order registered (module name order)."""
    return tuple(_MODELS)


def lookup(arch: str) -> Registered:
    try:
        return _MODELS[arch]
    except KeyError:
        raise ValueError(
            f"unknown model {arch!r}; choose one of {', '.join(architectures())}"
        ) from None


def hparams_class(arch: str, spec: ImageInput | TabularInput) -> type[Hparams]:
    entry = lookup(arch)
    try:
        return entry.hparams[spec.kind]
    except KeyError:
        raise ValueError(
            f"{arch} does not take {spec.kind} input; it takes {', '.join(entry.hparams)}"
        ) from None


def saved_hparams(
    arch: str, spec: ImageInput | TabularInput, recorded: dict[str, Any]
) -> dict[str, Any]:
    """A finished run's recorded hyperparameters, completed with the `saved_before` value
    of each field added since it was saved."""
    return {**hparams_class(arch, spec).saved_before, **recorded}


def resolve(
    arch: str, spec: ImageInput | TabularInput, overrides: dict[str, Any]
) -> dict[str, Any]:
    """The defaults of `arch` for `spec`'s kind with `overrides` applied, validated: a fresh
    dict each call (lists are copies), so callers may change it."""
    cls = hparams_class(arch, spec)
    try:
        return cls(**overrides).model_dump()
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            unknown = sorted(set(overrides) - set(cls.model_fields))
            raise ValueError(
                f"unknown hyperparameter(s) {unknown} for {arch} on {spec.kind} input; "
                f"valid: {sorted(cls.model_fields)}"
            ) from None
        raise ValueError(
            f"hyperparameter {key}={first.get('input')!r} for {arch} on {spec.kind} input: "
            f"{first['msg']}"
        ) from None


def offers_score(arch: str, spec: ImageInput | TabularInput, score_method: str) -> bool:
    """Whether `arch` accepts `score_method` on `spec`'s kind: the generic tests of a shared
    score run every architecture for which this holds."""
    try:
        resolve(arch, spec, {"score_method": score_method})
    except ValueError:
        return False
    return True
