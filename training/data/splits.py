"""`load_splits`: one entry point from a dataset name or path and a protocol to model-ready
train / val / test arrays. The public protocols keep their published fixed split seeds, so
two runs (and the benchmark beside them) always see the same split; a user's own data is
split with the training seed (see `training.data.custom` for how)."""

from __future__ import annotations

from pathlib import Path

from gansentry.manifest import TabularPreprocessing
from training.data import cifar, custom, idx, kdd, protocols
from training.data.download import download as fetch
from training.data.errors import DataError
from training.data.images import LabelledImages
from training.data.paths import default_root
from training.data.result import Splits

__all__ = ["DATASETS", "PROTOCOLS", "DEFAULT_SEEDS", "DataError", "Splits", "load_splits"]

DATASETS = ("mnist", "fashion-mnist", "cifar10", "kddcup99")
PROTOCOLS = ("one-class-normal", "one-class-anomalous", "kdd-dagmm", "kdd-normal", "custom")
# The public protocols' fixed split seeds. `custom` has none: it is split with `seed`.
DEFAULT_SEEDS = {
    "one-class-normal": 0,
    "one-class-anomalous": 0,
    "kdd-dagmm": 42,  # the DAGMM/EGBAD reference split
    "kdd-normal": 42,
}
ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar": "cifar10",
    "kdd": "kddcup99",
    "kdd99": "kddcup99",
    "kddcup": "kddcup99",
}
IMAGE_PROTOCOLS = ("one-class-normal", "one-class-anomalous")
TABULAR_SUFFIXES = (".csv", ".npz")


def _check_protocol(protocol: str, allowed: tuple[str, ...], what: str) -> None:
    if protocol not in allowed:
        raise DataError(
            f"protocol {protocol!r} does not apply to {what}; choose {' or '.join(allowed)}"
        )


def _load_labelled(name: str, root: Path) -> LabelledImages:
    if name == "cifar10":
        return cifar.load_cifar10(root)
    return idx.load_idx_dataset(name, root)


def _is_archive(path: Path) -> bool:
    return path.is_file() and (".tar" in path.name or path.name.endswith(".tgz"))


def _is_kdd_file(path: Path) -> bool:
    return path.is_file() and path.name.startswith("kddcup.data")


def load_splits(
    dataset: str,
    protocol: str | None = None,
    *,
    normal_class: str | int | list[str] | None = None,
    anomalous_class: str | int | None = None,
    root: Path | None = None,
    split_seed: int | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    download: bool = False,
    download_base_url: str | None = None,
    val_fraction: float = 0.1,
    label_column: str | None = None,
    symbolic_columns: list[str] | None = None,
    log_columns: list[str] | None = None,
    max_train: int | None = None,
    preprocessing: TabularPreprocessing | None = None,
    seed: int = 0,
    test: str | Path | None = None,
) -> Splits:
    """Load `dataset` (a name in DATASETS or a path to the user's data) split by `protocol`.

    `normal_class` picks the class by index or name; under `one-class-normal` several
    classes, comma-separated ("0,1,2,3,4") or a list, are normal together (a multi-modal
    normal class). Under `one-class-anomalous` it names the (one) ANOMALOUS class (as
    GANomaly's `--abnormal_class` does); `anomalous_class` says the same thing explicitly.
    `image_size` resizes square through the service's preprocessing; tabular data ignores
    it. `log_columns` (tables only) scales those numeric columns as log(1 + v).
    `preprocessing` encodes a table with a model's own fitted preprocessing instead of
    fitting one on the train split, so evaluation feeds a model
    the features it was trained on and is served. Raises DataError naming the file, field
    or class at fault.

    `split_seed` fixes the split; without it the public protocols use their published seed
    (DEFAULT_SEEDS) and a user's own data is split with `seed`, the training seed. `test`
    (own data only) is a table or image folder scored whole as the test set. The returned
    `notes` say which seed split what and where the test set came from."""
    if not 0 < val_fraction < 0.5:
        raise DataError(f"val_fraction must be between 0 and 0.5, got {val_fraction}")
    if max_train is not None and max_train < 1:
        raise DataError(f"max_train must be at least 1, got {max_train}")
    if protocol is not None and protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    root = Path(root).expanduser() if root is not None else default_root()
    name = ALIASES.get(dataset.strip().lower(), dataset.strip().lower())
    common = {"val_fraction": val_fraction, "max_train": max_train}
    if test is not None and not is_own_data(name, Path(dataset).expanduser()):
        raise DataError(
            f"--test applies to your own table or image folder, not to {dataset}: "
            "a public protocol's test split is fixed"
        )

    if name in DATASETS:
        if download:
            try:
                _locate(name, root)
            except DataError:
                fetch(name, root, base_url=download_base_url)
        if name == "kddcup99":
            protocol = protocol or "kdd-dagmm"
            _check_protocol(protocol, kdd.KDD_PROTOCOLS, "kddcup99")
            seed = DEFAULT_SEEDS[protocol] if split_seed is None else split_seed
            return _public(
                kdd.kdd_dagmm_splits(
                    kdd.locate_kdd(root),
                    split_seed=seed,
                    dataset=name,
                    log_columns=log_columns,
                    preprocessing=preprocessing,
                    protocol=protocol,
                    **common,
                ),
                split_seed,
            )
        protocol = protocol or "one-class-normal"
        _check_protocol(protocol, IMAGE_PROTOCOLS, name)
        _no_log_columns(log_columns, dataset)
        return _public(
            _one_class(
                _load_labelled(name, root),
                protocol,
                normal_class,
                anomalous_class,
                split_seed,
                image_size,
                channels,
                name,
                common,
            ),
            split_seed,
        )

    path = Path(dataset).expanduser()
    if not path.exists():
        raise DataError(
            f"dataset {dataset!r} is neither one of {', '.join(DATASETS)} nor an existing path"
        )
    if _is_kdd_file(path):
        protocol = protocol or "kdd-dagmm"
        _check_protocol(protocol, kdd.KDD_PROTOCOLS, str(path))
        seed = DEFAULT_SEEDS[protocol] if split_seed is None else split_seed
        return _public(
            kdd.kdd_dagmm_splits(
                path,
                split_seed=seed,
                dataset=str(path),
                log_columns=log_columns,
                preprocessing=preprocessing,
                protocol=protocol,
                **common,
            ),
            split_seed,
        )
    if cifar.is_class_folder(path) or _is_archive(path):
        protocol = protocol or "one-class-normal"
        _check_protocol(protocol, IMAGE_PROTOCOLS, f"{path} (train/test class folders)")
        _no_log_columns(log_columns, dataset)
        return _public(
            _one_class(
                cifar.load_source(path),
                protocol,
                normal_class,
                anomalous_class,
                split_seed,
                image_size,
                channels,
                str(path),
                common,
            ),
            split_seed,
        )
    protocol = protocol or "custom"
    _check_protocol(protocol, ("custom",), str(path))
    seed = seed if split_seed is None else split_seed
    test_path = None if test is None else Path(test).expanduser()
    if test_path is not None and not test_path.exists():
        raise DataError(f"--test {test}: no such file or folder")
    if path.is_dir():
        if not (path / "normal").is_dir():
            raise DataError(
                f"{path}: expected a normal/ folder (and optionally anomalous/), "
                "or train/ and test/ class folders"
            )
        _no_log_columns(log_columns, dataset)
        return custom.image_folder_splits(
            path,
            split_seed=seed,
            image_size=image_size,
            channels=channels,
            test=test_path,
            **common,
        )
    if path.suffix.lower() not in TABULAR_SUFFIXES:
        raise DataError(f"{path}: unsupported file type; use .csv, .npz or an image folder")
    return custom.tabular_splits(
        path,
        split_seed=seed,
        label_column=label_column,
        symbolic_columns=symbolic_columns,
        log_columns=log_columns,
        preprocessing=preprocessing,
        test=test_path,
        **common,
    )


def is_own_data(name: str, path: Path) -> bool:
    """A user's table or image folder (the custom protocol), not a public dataset."""
    if name in DATASETS or _is_kdd_file(path) or _is_archive(path):
        return False
    return not cifar.is_class_folder(path)


def _public(splits: Splits, split_seed: int | None) -> Splits:
    how = "given split seed" if split_seed is not None else "published fixed split seed"
    splits.notes.append(
        f"{splits.protocol} split of {splits.dataset}: {how} {splits.split_seed} "
        "(--seed seeds training only)"
    )
    return splits


def _locate(name: str, root: Path) -> object:
    if name == "kddcup99":
        return kdd.locate_kdd(root)
    if name == "cifar10":
        return cifar.locate_cifar10(root)
    return idx.locate(name, root)


def _no_log_columns(log_columns: list[str] | None, dataset: str) -> None:
    if log_columns:
        raise DataError(f"{dataset} holds images: --log-columns applies to tables only")


def _one_class(
    data: LabelledImages,
    protocol: str,
    normal_class: str | int | list[str] | None,
    anomalous_class: str | int | None,
    split_seed: int | None,
    image_size: int | None,
    channels: int | None,
    dataset: str,
    common: dict,
) -> Splits:
    seed = DEFAULT_SEEDS[protocol] if split_seed is None else split_seed
    choices = ", ".join(f"{i}={c}" for i, c in enumerate(data.classes))
    kwargs = {
        "split_seed": seed,
        "image_size": image_size,
        "channels": channels,
        "dataset": dataset,
        **common,
    }
    if protocol == "one-class-normal":
        if anomalous_class is not None:
            raise DataError("one-class-normal takes normal_class, not anomalous_class")
        if normal_class is None:
            raise DataError(f"one-class-normal needs a normal class; choose one of {choices}")
        return protocols.one_class_normal(data, normal_class, **kwargs)
    if (
        normal_class is not None
        and anomalous_class is not None
        and data.class_index(normal_class) != data.class_index(anomalous_class)
    ):
        raise DataError(
            "one-class-anomalous: normal_class names the anomalous class here; "
            "give it once (or use anomalous_class)"
        )
    chosen = anomalous_class if anomalous_class is not None else normal_class
    if chosen is None:
        raise DataError(f"one-class-anomalous needs the anomalous class; choose one of {choices}")
    if isinstance(chosen, (list, tuple)) or "," in str(chosen):
        raise DataError(
            f"one-class-anomalous takes one anomalous class, got {chosen!r}; several normal "
            "classes together are one-class-normal with a comma-separated --normal-class"
        )
    return protocols.one_class_anomalous(data, chosen, **kwargs)
