"""The one-class protocols on labelled image datasets, exactly as the papers ran them.
Sample selection works on uint8 pixels; conversion to model inputs happens once, last."""

from __future__ import annotations

import numpy as np

from training.data.errors import DataError
from training.data.images import LabelledImages, image_spec, to_model_input
from training.data.result import Splits

TRAIN_FRACTION_ANOMALOUS = 0.8  # GANomaly: pooled normals split 80/20


def _hold_out(rows: np.ndarray, fraction: float, rng: np.random.RandomState) -> tuple:
    """(train, val) index arrays: a random `fraction` of rows held out as validation."""
    rows = rows[rng.permutation(len(rows))]
    n_val = max(1, int(round(len(rows) * fraction)))
    if len(rows) - n_val < 1:
        raise DataError(f"only {len(rows)} normal training samples: too few to hold out a val set")
    return np.sort(rows[n_val:]), np.sort(rows[:n_val])


def _cap(rows: np.ndarray, max_train: int | None, rng: np.random.RandomState) -> np.ndarray:
    if max_train is None or len(rows) <= max_train:
        return rows
    return np.sort(rows[rng.permutation(len(rows))[:max_train]])


def one_class_normal(
    data: LabelledImages,
    normal_class: str | int,
    *,
    split_seed: int,
    val_fraction: float,
    max_train: int | None,
    image_size: int | None,
    channels: int | None,
    dataset: str,
) -> Splits:
    """Deep SVDD / OCGAN / MEMGAN: train on one class's train split (less a validation
    hold-out), test on the full official test split with the other classes as anomalies."""
    k = data.class_index(normal_class)
    rng = np.random.RandomState(split_seed)
    rows = np.flatnonzero(data.train_y == k)
    if len(rows) == 0:
        raise DataError(f"{data.source}: class {data.classes[k]!r} has no training images")
    train_rows, val_rows = _hold_out(rows, val_fraction, rng)
    train_rows = _cap(train_rows, max_train, rng)
    spec = image_spec(data.train_x.shape[1:3], data.native_channels, image_size, channels)
    return Splits(
        train=to_model_input(data.train_x[train_rows], spec),
        val=to_model_input(data.train_x[val_rows], spec),
        test=to_model_input(data.test_x, spec),
        test_labels=(data.test_y != k).astype(np.int64),
        input_spec=spec,
        dataset=dataset,
        protocol="one-class-normal",
        normal_classes=[data.classes[k]],
        anomalous_classes=[c for i, c in enumerate(data.classes) if i != k],
        split_seed=split_seed,
        test_classes=np.asarray(data.classes)[data.test_y],
    )


def one_class_anomalous(
    data: LabelledImages,
    anomalous_class: str | int,
    *,
    split_seed: int,
    val_fraction: float,
    max_train: int | None,
    image_size: int | None,
    channels: int | None,
    dataset: str,
) -> Splits:
    """GANomaly / EGBAD: `anomalous_class` is the ANOMALY. The other classes, pooled from
    train and test, split 80/20; test = the held-out 20% of normals plus every image of
    the anomalous class; validation is carved from the 80%."""
    k = data.class_index(anomalous_class)
    rng = np.random.RandomState(split_seed)
    pixels = np.concatenate([data.train_x, data.test_x])
    classes = np.concatenate([data.train_y, data.test_y])
    normal = np.flatnonzero(classes != k)
    anomalous = np.flatnonzero(classes == k)
    if len(anomalous) == 0:
        raise DataError(f"{data.source}: class {data.classes[k]!r} has no images")
    normal = normal[rng.permutation(len(normal))]
    n_fit = int(len(normal) * TRAIN_FRACTION_ANOMALOUS)
    fit_rows, test_normal = normal[:n_fit], np.sort(normal[n_fit:])
    train_rows, val_rows = _hold_out(fit_rows, val_fraction, rng)
    train_rows = _cap(train_rows, max_train, rng)
    test_rows = np.concatenate([test_normal, anomalous])
    spec = image_spec(data.train_x.shape[1:3], data.native_channels, image_size, channels)
    return Splits(
        train=to_model_input(pixels[train_rows], spec),
        val=to_model_input(pixels[val_rows], spec),
        test=to_model_input(pixels[test_rows], spec),
        test_labels=np.concatenate(
            [np.zeros(len(test_normal), np.int64), np.ones(len(anomalous), np.int64)]
        ),
        input_spec=spec,
        dataset=dataset,
        protocol="one-class-anomalous",
        normal_classes=[c for i, c in enumerate(data.classes) if i != k],
        anomalous_classes=[data.classes[k]],
        split_seed=split_seed,
        test_classes=np.asarray(data.classes)[classes[test_rows]],
    )
