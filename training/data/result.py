"""What every loader returns: model-ready splits plus the facts the manifest records."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gansentry.manifest import ImageInput, TabularInput


@dataclass
class Splits:
    """float32 model inputs (images [N, C, H, W] in [0, 1]; tabular [N, F] preprocessed).
    `val` holds held-out normal data only: it selects checkpoints and calibrates the
    threshold, so no decision ever sees a test label."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    input_spec: ImageInput | TabularInput
    dataset: str
    protocol: str
    normal_classes: list[str]
    anomalous_classes: list[str]
    split_seed: int
    # Each test sample's original class (digit, CIFAR class, KDD attack type) where the
    # source has more than normal/anomalous: evaluation breaks its errors down by it.
    test_classes: np.ndarray | None = None

    def summary(self) -> str:
        anomalous = int(self.test_labels.sum())
        return (
            f"{self.dataset} {self.protocol}: train {len(self.train)}, val {len(self.val)}, "
            f"test {len(self.test)} ({anomalous} anomalous), input {tuple(self.train.shape[1:])}"
        )
