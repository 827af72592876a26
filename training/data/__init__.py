"""Datasets and evaluation protocols: MNIST, Fashion-MNIST, CIFAR-10, KDD Cup 99 and users'
own image folders or tables, split the way the papers measured them."""

from training.data.splits import (
    DATASETS,
    DEFAULT_SEEDS,
    PROTOCOLS,
    DataError,
    Splits,
    load_splits,
)

__all__ = ["DATASETS", "DEFAULT_SEEDS", "PROTOCOLS", "DataError", "Splits", "load_splits"]
