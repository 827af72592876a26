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


def normal_class_indices(data: LabelledImages, normal_class: str | int | list) -> list[int]:
    """The normal classes' indices: one class, or several given comma-separated ("0,1,2,3,4")
    or as a list, which together form a multi-modal normal class. At least one class must be
    left over to be the anomalies."""
    if isinstance(normal_class, str):
        items: list = normal_class.split(",")
    else:
        items = list(normal_class) if isinstance(normal_class, (list, tuple)) else [normal_class]
    names = [c.strip() if isinstance(c, str) else c for c in items]
    if not names or any(str(n) == "" for n in names):
        raise DataError(
            f"normal class {normal_class!r} has an empty entry; give classes separated by "
            "commas, e.g. 0,1,2"
        )
    ks = [data.class_index(n) for n in names]
    repeated = sorted({data.classes[k] for k in ks if ks.count(k) > 1})
    if repeated:
        raise DataError(f"normal class {repeated[0]!r} is given more than once in {normal_class!r}")
    if len(ks) == len(data.classes):
        raise DataError(
            f"all {len(ks)} classes of {data.source} are normal: leave at least one class "
            "out to be the anomalies"
        )
    return sorted(ks)


def one_class_normal(
    data: LabelledImages,
    normal_class: str | int | list,
    *,
    split_seed: int,
    val_fraction: float,
    max_train: int | None,
    image_size: int | None,
    channels: int | None,
    dataset: str,
) -> Splits:
    """Deep SVDD / OCGAN / MEMGAN: train on one class's train split (less a validation
    hold-out), test on the full official test split with the other classes as anomalies.
    Several normal classes (MMOC-GAN's multi-modal normal class, e.g. digits 0-4) are pooled
    the same way: their train images together, the validation hold-out drawn from the pool."""
    ks = normal_class_indices(data, normal_class)
    rng = np.random.RandomState(split_seed)
    for k in ks:
        if not np.any(data.train_y == k):
            raise DataError(f"{data.source}: class {data.classes[k]!r} has no training images")
    rows = np.flatnonzero(np.isin(data.train_y, ks))
    train_rows, val_rows = _hold_out(rows, val_fraction, rng)
    train_rows = _cap(train_rows, max_train, rng)
    spec = image_spec(data.train_x.shape[1:3], data.native_channels, image_size, channels)
    return Splits(
        train=to_model_input(data.train_x[train_rows], spec),
        val=to_model_input(data.train_x[val_rows], spec),
        test=to_model_input(data.test_x, spec),
        test_labels=(~np.isin(data.test_y, ks)).astype(np.int64),
        input_spec=spec,
        dataset=dataset,
        protocol="one-class-normal",
        normal_classes=[data.classes[k] for k in ks],
        anomalous_classes=[c for i, c in enumerate(data.classes) if i not in ks],
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
