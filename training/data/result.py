"""What every loader returns: model-ready splits plus the facts the manifest records."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    split_seed: int | None
    # Each test sample's original class (digit, CIFAR class, KDD attack type) where the
    # source has more than normal/anomalous: evaluation breaks its errors down by it.
    test_classes: np.ndarray | None = None
    # What the loader decided and why, in words (which seed split what, where the test set
    # came from): `gansentry train` prints these, so no row is held out silently.
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        anomalous = int(np.asarray(self.test_labels).sum())
        return {
            "train": len(self.train),
            "validation": len(self.val),
            "test_normal": len(self.test) - anomalous,
            "test_anomalous": anomalous,
        }

    def summary(self) -> str:
        c = self.counts()
        return (
            f"{self.dataset} {self.protocol}: train {c['train']}, validation {c['validation']}, "
            f"test {c['test_normal']} normal + {c['test_anomalous']} anomalous, "
            f"input {tuple(self.input_spec.shape)}"
        )
