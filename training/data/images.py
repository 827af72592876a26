"""A labelled image dataset with the official train/test split, as raw uint8 pixels.
Conversion to model inputs happens after the protocol has picked its samples."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from gansentry.manifest import ImageInput
from gansentry.preprocessing import uint8_batch_to_array
from training.data.errors import DataError


@dataclass
class LabelledImages:
    """uint8 pixels [N, H, W] (grey) or [N, H, W, 3] (colour) with int64 class indices."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    source: str

    @property
    def native_channels(self) -> int:
        return 1 if self.train_x.ndim == 3 else int(self.train_x.shape[3])

    def class_index(self, name: str | int) -> int:
        """A class by index ("3", 3) or by name (case-insensitive)."""
        text = str(name).strip()
        lowered = [c.lower() for c in self.classes]
        if text.lower() in lowered:
            return lowered.index(text.lower())
        if text.lstrip("-").isdigit() and 0 <= int(text) < len(self.classes):
            return int(text)
        choices = ", ".join(f"{i}={c}" for i, c in enumerate(self.classes))
        raise DataError(f"class {name!r} does not exist in {self.source}; choose one of {choices}")


def image_spec(
    native_hw: tuple[int, int], native_channels: int, image_size: int | None, channels: int | None
) -> ImageInput:
    h, w = (image_size, image_size) if image_size else native_hw
    c = channels or native_channels
    if c not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {c}")
    try:
        return ImageInput(channels=c, height=h, width=w)
    except ValueError as e:
        raise DataError(f"image size {h}x{w} is not usable: must be 8 to 1024 pixels") from e


def to_model_input(pixels: np.ndarray, spec: ImageInput) -> np.ndarray:
    """uint8 batch -> float32 [N, C, H, W] in [0, 1] through the service's own resize path,
    so offline and served scores see identical pixels."""
    if len(pixels) == 0:
        return np.zeros((0, *spec.shape), dtype=np.float32)
    return uint8_batch_to_array(pixels, spec)


def most_common(values: list[tuple[int, int]]) -> tuple[int, int]:
    return Counter(values).most_common(1)[0][0]
