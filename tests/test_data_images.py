"""MNIST / Fashion-MNIST IDX and CIFAR-10 (pickle batches, class folders, tarballs) loaders
and the two one-class protocols, on generated files."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
from PIL import Image

from gansentry.manifest import ImageInput
from gansentry.preprocessing import image_to_array
from tests.data_factories import (
    CIFAR10_CLASSES,
    make_cifar_batches,
    make_class_folders,
    make_mnist,
    write_idx,
)
from training.data import DataError, load_splits
from training.data.idx import read_idx


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GANSENTRY_CACHE", str(tmp_path / "cache"))


def _row_hashes(x: np.ndarray) -> set[str]:
    return {hashlib.sha1(r.tobytes()).hexdigest() for r in x}


def _assert_disjoint(s) -> None:
    train, val, test = _row_hashes(s.train), _row_hashes(s.val), _row_hashes(s.test)
    assert len(train) == len(s.train) and len(val) == len(s.val)
    assert not train & val and not train & test and not val & test


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_gz_and_raw_one_class_normal(tmp_path, gz):
    root = make_mnist(tmp_path, n_train=200, n_test=100, gz=gz)
    s = load_splits("mnist", normal_class=3, root=root)
    assert s.protocol == "one-class-normal" and s.split_seed == 0
    assert s.train.dtype == np.float32 and s.train.shape[1:] == (1, 28, 28)
    assert s.input_spec == ImageInput(channels=1, height=28, width=28)
    # 20 train images of class 3: 10% held out as val, the full test split kept.
    assert (len(s.train), len(s.val), len(s.test)) == (18, 2, 100)
    assert s.test_labels.dtype == np.int64 and s.test_labels.sum() == 90
    assert s.normal_classes == ["3"] and len(s.anomalous_classes) == 9
    assert s.train.min() >= 0.0 and s.train.max() <= 1.0
    _assert_disjoint(s)


def test_mnist_pixels_and_labels_are_read_exactly(tmp_path):
    root = make_mnist(tmp_path, n_train=50, n_test=30)
    raw = read_idx(root / "mnist" / "t10k-images-idx3-ubyte.gz", 3)
    labels = read_idx(root / "mnist" / "t10k-labels-idx1-ubyte.gz", 1)
    s = load_splits("mnist", normal_class="0", root=root)
    np.testing.assert_array_equal(s.test[:, 0], raw.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(s.test_labels, (labels != 0).astype(np.int64))
    assert list(s.test_classes) == [str(d) for d in labels]


def test_image_size_resizes_through_the_service_path(tmp_path):
    root = make_mnist(tmp_path, n_train=50, n_test=20)
    s = load_splits("mnist", normal_class=1, root=root, image_size=32)
    assert s.test.shape[1:] == (1, 32, 32) and s.input_spec.height == 32
    raw = read_idx(root / "mnist" / "t10k-images-idx3-ubyte.gz", 3)
    served = image_to_array(Image.fromarray(raw[5]), s.input_spec)
    np.testing.assert_array_equal(s.test[5], served)
    rgb = load_splits("mnist", normal_class=1, root=root, channels=3)
    assert rgb.train.shape[1:] == (3, 28, 28)


def test_fashion_mnist_class_names(tmp_path):
    root = make_mnist(tmp_path, subdir="fashion-mnist", n_train=60, n_test=30)
    s = load_splits("fashion-mnist", normal_class="sneaker", root=root)
    assert s.normal_classes == ["Sneaker"]
    assert load_splits("fashion-mnist", normal_class=7, root=root).normal_classes == ["Sneaker"]


def test_one_class_anomalous_pools_train_and_test(tmp_path):
    root = make_mnist(tmp_path, n_train=200, n_test=100)
    s = load_splits("mnist", "one-class-anomalous", normal_class=2, root=root)
    # 270 normals pooled: 216 (80%) fit -> 194 train + 22 val; test = 54 normals + all 30 twos.
    assert s.normal_classes == [c for c in map(str, range(10)) if c != "2"]
    assert s.anomalous_classes == ["2"]
    assert (len(s.train), len(s.val), len(s.test)) == (194, 22, 84)
    assert s.test_labels.sum() == 30 and (s.test_labels == 0).sum() == 54
    assert set(s.test_classes[s.test_labels == 1]) == {"2"}
    assert "2" not in set(s.test_classes[s.test_labels == 0])
    _assert_disjoint(s)
    same = load_splits("mnist", "one-class-anomalous", anomalous_class="2", root=root)
    np.testing.assert_array_equal(same.train, s.train)
    with pytest.raises(DataError, match="anomalous class"):
        load_splits("mnist", "one-class-anomalous", normal_class=1, anomalous_class=2, root=root)


def test_split_seed_is_fixed_by_default_and_changes_on_request(tmp_path):
    root = make_mnist(tmp_path, n_train=200, n_test=50)
    a = load_splits("mnist", "one-class-anomalous", normal_class=4, root=root)
    b = load_splits("mnist", "one-class-anomalous", normal_class=4, root=root)
    c = load_splits("mnist", "one-class-anomalous", normal_class=4, root=root, split_seed=7)
    np.testing.assert_array_equal(a.train, b.train)
    assert not np.array_equal(a.val, c.val)


def test_small_classes_still_hold_out_a_validation_sample(tmp_path):
    root = make_mnist(tmp_path, n_train=50, n_test=20)
    s = load_splits("mnist", normal_class=6, root=root)
    assert (len(s.train), len(s.val)) == (4, 1)


def test_max_train_caps_training_samples_only(tmp_path):
    root = make_mnist(tmp_path, n_train=400, n_test=50)
    s = load_splits("mnist", normal_class=5, root=root, max_train=10)
    assert len(s.train) == 10 and len(s.val) == 4 and len(s.test) == 50


def test_several_normal_classes_form_one_multi_modal_normal_class(tmp_path):
    root = make_mnist(tmp_path, n_train=200, n_test=100)
    s = load_splits("mnist", "one-class-normal", normal_class="4, 0,2,1,3", root=root)
    assert s.protocol == "one-class-normal"
    assert s.normal_classes == ["0", "1", "2", "3", "4"]
    assert s.anomalous_classes == ["5", "6", "7", "8", "9"]
    # 5 classes x 20 train images = 100, 10% held out; the full test split kept.
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 100)
    raw_test = read_idx(root / "mnist" / "t10k-labels-idx1-ubyte.gz", 1)
    np.testing.assert_array_equal(s.test_labels, (raw_test >= 5).astype(np.int64))
    assert s.test_labels.sum() == 50
    # Train and val are exactly the normal classes' train images: none from the test split,
    # none of an anomalous class.
    train_x = read_idx(root / "mnist" / "train-images-idx3-ubyte.gz", 3)
    train_y = read_idx(root / "mnist" / "train-labels-idx1-ubyte.gz", 1)
    normal_train = train_x[train_y < 5].astype(np.float32)[:, None] / 255.0
    assert _row_hashes(s.train) | _row_hashes(s.val) == _row_hashes(normal_train)
    _assert_disjoint(s)
    # A list says the same; the reverse split makes the other digits normal.
    same = load_splits("mnist", normal_class=["0", "1", "2", "3", "4"], root=root)
    np.testing.assert_array_equal(same.train, s.train)
    rev = load_splits("mnist", normal_class="5,6,7,8,9", root=root)
    np.testing.assert_array_equal(rev.test_labels, 1 - s.test_labels)


@pytest.mark.parametrize(
    ("normal_class", "message"),
    [
        ("0,1,12", r"class '12' does not exist.*0=0, 1=1"),
        ("0,1,1", r"normal class '1' is given more than once in '0,1,1'"),
        ("0,,1", r"empty entry"),
        (",".join(str(c) for c in range(10)), r"all 10 classes .* are normal"),
    ],
)
def test_bad_normal_class_lists_are_named(tmp_path, normal_class, message):
    root = make_mnist(tmp_path, n_train=30, n_test=10)
    with pytest.raises(DataError, match=message):
        load_splits("mnist", normal_class=normal_class, root=root)


def test_one_class_anomalous_takes_one_class(tmp_path):
    root = make_mnist(tmp_path, n_train=30, n_test=10)
    with pytest.raises(DataError, match="one-class-anomalous takes one anomalous class"):
        load_splits("mnist", "one-class-anomalous", normal_class="1,2", root=root)


@pytest.mark.parametrize("as_tar", [True, False])
def test_cifar_pickle_batches(tmp_path, as_tar):
    root = make_cifar_batches(tmp_path, n_per_batch=20, as_tar=as_tar)
    s = load_splits("cifar10", normal_class="cat", root=root)
    assert s.train.shape[1:] == (3, 32, 32) and s.input_spec.channels == 3
    # 5 batches x 2 cats = 10, one held out; test batch of 20 has 2 cats.
    assert (len(s.train), len(s.val), len(s.test)) == (9, 1, 20)
    assert s.test_labels.sum() == 18 and s.normal_classes == ["cat"]
    _assert_disjoint(s)


@pytest.mark.parametrize(("as_tar", "ext"), [(True, "jpg"), (False, "png"), (True, "png")])
def test_cifar_class_folders_extracted_and_tarred(tmp_path, as_tar, ext):
    make_class_folders(tmp_path / "cifar10" / "cifar10-jpeg", 10, 4, ext=ext, as_tar=as_tar)
    s = load_splits("cifar10", normal_class=0, root=tmp_path)
    assert s.normal_classes == ["airplane"]
    assert (len(s.train), len(s.val), len(s.test)) == (9, 1, 40)
    assert s.test_labels.sum() == 36
    again = load_splits("cifar10", normal_class=0, root=tmp_path)  # from the cache
    np.testing.assert_array_equal(again.test, s.test)
    assert any((tmp_path / "cache").glob("images-*.npz"))


def test_png_folders_decode_losslessly(tmp_path):
    folder = make_class_folders(tmp_path / "cifar10", 2, 2, ext="png")
    s = load_splits("cifar10", normal_class="ship", root=tmp_path)
    png = Image.open(folder / "test" / "airplane" / "0000.png")
    np.testing.assert_array_equal(s.test[0], image_to_array(png, s.input_spec))


def test_user_class_folder_path_uses_one_class_protocols(tmp_path):
    folder = make_class_folders(tmp_path / "parts", 6, 3, classes=["ok", "bent", "cracked"])
    s = load_splits(str(folder), "one-class-anomalous", normal_class="cracked")
    assert s.anomalous_classes == ["cracked"] and s.dataset == str(folder)
    assert s.test_labels.sum() == 9


def test_unknown_class_names_the_valid_ones(tmp_path):
    root = make_mnist(tmp_path, n_train=30, n_test=10)
    with pytest.raises(DataError, match=r"class 12 does not exist.*0=0, 1=1"):
        load_splits("mnist", normal_class=12, root=root)
    with pytest.raises(DataError, match="needs a normal class"):
        load_splits("mnist", root=root)
    make_cifar_batches(tmp_path, 10)
    with pytest.raises(DataError, match=r"'zebra' does not exist.*airplane"):
        load_splits("cifar10", normal_class="zebra", root=tmp_path)


def test_bad_protocol_and_dataset_names(tmp_path):
    root = make_mnist(tmp_path, n_train=30, n_test=10)
    with pytest.raises(DataError, match="unknown protocol 'one-class'"):
        load_splits("mnist", "one-class", normal_class=0, root=root)
    with pytest.raises(DataError, match="'kdd-dagmm' does not apply to mnist"):
        load_splits("mnist", "kdd-dagmm", root=root)
    with pytest.raises(DataError, match="neither one of mnist"):
        load_splits(str(tmp_path / "nope"), root=root)


def test_missing_files_name_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz not found.*--download"):
        load_splits("mnist", normal_class=0, root=tmp_path)
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        load_splits("cifar10", normal_class=0, root=tmp_path)


def test_corrupt_idx_files_are_named(tmp_path):
    root = make_mnist(tmp_path, n_train=30, n_test=10)
    images = root / "mnist" / "train-images-idx3-ubyte.gz"
    good = images.read_bytes()
    images.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: cannot read"):
        load_splits("mnist", normal_class=0, root=root)
    raw = gzip.decompress(good)
    images.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: wrong size"):
        load_splits("mnist", normal_class=0, root=root)
    images.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]))
    with pytest.raises(DataError, match="not an IDX file.*magic 00000d03"):
        load_splits("mnist", normal_class=0, root=root)
    images.write_bytes(good)
    write_idx(root / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(DataError, match="29 labels for 30 images"):
        load_splits("mnist", normal_class=0, root=root)


def test_corrupt_cifar_sources_are_named(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: cannot read archive"):
        load_splits("cifar10", normal_class=0, root=tmp_path)
    make_cifar_batches(tmp_path / "b", 10, as_tar=False)
    batch = tmp_path / "b" / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(DataError, match=r"data_batch_3: not a CIFAR python batch.*refusing"):
        load_splits("cifar10", normal_class=0, root=tmp_path / "b")
    pics = make_class_folders(tmp_path / "c" / "cifar10", 2, 1)
    (pics / "train" / "cat" / "0001.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"train/cat/0001\.png: cannot decode image"):
        load_splits("cifar10", normal_class=0, root=tmp_path / "c")


def test_loading_never_writes_into_the_dataset_folder(tmp_path):
    root = make_mnist(tmp_path / "data", n_train=30, n_test=10)
    make_class_folders(root / "cifar10" / "cifar10-jpeg", 2, 1, as_tar=True)
    before = sorted(p for p in root.rglob("*"))
    load_splits("mnist", normal_class=0, root=root)
    load_splits("cifar10", normal_class=0, root=root)
    assert sorted(p for p in root.rglob("*")) == before
    assert CIFAR10_CLASSES[0] == "airplane"
