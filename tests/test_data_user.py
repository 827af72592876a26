"""Users' own data under the custom protocol: image folders of mixed sizes and modes,
CSV with label and symbolic columns, NPZ."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from gansentry.preprocessing import decode_image
from tests.data_factories import make_csv, make_image_folder, make_npz, tabular_rows
from training.data import DataError, load_splits


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GANSENTRY_CACHE", str(tmp_path / "cache"))


def _disjoint(*arrays: np.ndarray) -> bool:
    sets = [{hashlib.sha1(r.tobytes()).hexdigest() for r in a} for a in arrays]
    return all(len(s) == len(a) for s, a in zip(sets, arrays, strict=True)) and len(
        set().union(*sets)
    ) == sum(len(s) for s in sets)


def test_image_folder_mixed_sizes_and_modes(tmp_path):
    folder = make_image_folder(tmp_path / "widgets", n_normal=20, n_anomalous=6)
    s = load_splits(str(folder))
    assert s.protocol == "custom" and s.dataset == str(folder)
    # Most files are 28x28 grey, so that is the model's native input.
    assert (s.input_spec.channels, s.input_spec.height, s.input_spec.width) == (1, 28, 28)
    assert (len(s.train), len(s.val), len(s.test)) == (14, 2, 4 + 6)
    assert s.test_labels.tolist() == [0] * 4 + [1] * 6
    assert _disjoint(s.train, s.val, s.test)
    # Each file went through the service's own decoder (a 40x36 RGB one included).
    wide = folder / "anomalous" / "0002.png"
    np.testing.assert_array_equal(s.test[4 + 2], decode_image(wide.read_bytes(), s.input_spec))


def test_image_folder_size_and_channels_options(tmp_path):
    folder = make_image_folder(
        tmp_path / "f", 9, 0, sizes=((30, 30), (30, 30), (64, 64)), modes=("RGB",)
    )
    s = load_splits(str(folder))
    assert s.input_spec.shape == (3, 32, 32)  # 30 rounded to a multiple of 4
    assert s.anomalous_classes == [] and s.test_labels.sum() == 0
    small = load_splits(str(folder), image_size=16, channels=1)
    assert small.train.shape[1:] == (1, 16, 16)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "normal").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty/normal: no images"):
        load_splits(str(tmp_path / "empty"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="expected a normal/ folder"):
        load_splits(str(tmp_path / "flat"))
    folder = make_image_folder(tmp_path / "bad", 5, 1)
    (folder / "normal" / "0003.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"normal/0003\.png: cannot decode"):
        load_splits(str(folder))
    folder = make_image_folder(tmp_path / "bad2", 5, 1)
    (folder / "anomalous" / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"anomalous/0000\.png"):
        load_splits(str(folder))
    with pytest.raises(DataError, match="only 1 normal sample"):
        load_splits(str(make_image_folder(tmp_path / "tiny", 1, 0)))
    with pytest.raises(DataError, match="only 2 normal sample.*train, validation and test"):
        load_splits(str(make_image_folder(tmp_path / "tiny2", 2, 1)))
    with pytest.raises(DataError, match="'one-class-normal' does not apply"):
        load_splits(str(make_image_folder(tmp_path / "ok", 5, 0)), "one-class-normal")


def test_csv_with_label_and_symbolic_columns(tmp_path):
    path = make_csv(tmp_path / "m.csv", n_normal=60, n_anomalous=15)
    s = load_splits(str(path))
    prep = s.input_spec.preprocessing
    assert s.input_spec.feature_names == ["a", "b", "colour=blue", "colour=green", "colour=red"]
    assert (len(s.train), len(s.val), len(s.test)) == (42, 6, 12 + 15)
    assert s.test_labels.sum() == 15 and s.anomalous_classes == ["anomalous"]
    # The label text is kept as each test sample's class, for evaluation's breakdown.
    assert list(s.test_classes) == ["normal"] * 12 + ["anomaly"] * 15
    # Scaling fitted on the train split: train spans [0, 1]; an unseen colour is all zeros.
    np.testing.assert_allclose(s.train.min(axis=0)[:2], 0.0, atol=1e-6)
    np.testing.assert_allclose(s.train.max(axis=0)[:2], 1.0, atol=1e-6)
    assert (s.test[s.test_labels == 1][:, 2:] == 0).all()
    assert s.test[s.test_labels == 1][:, 1].min() > 1.0  # b in [10, 20] vs train [0, 10]
    rows = tabular_rows(60, 15)
    normal_a = sorted(r["a"] for r in rows if r["label"] == "normal")
    train_a = sorted(s.train[:, 0] * prep.scale[0] + prep.offset[0])
    assert all(np.isclose(a, normal_a, atol=1e-4).any() for a in train_a)
    assert prep.offset[0] == pytest.approx(min(train_a), abs=1e-5)
    assert _disjoint(s.train, s.val, s.test)


def test_csv_options_and_unlabelled_files(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("x,mode,verdict\n" + "".join(f"{i},{i % 2},0\n" for i in range(20)))
    s = load_splits(str(path), label_column="verdict", symbolic_columns=["mode"])
    assert s.input_spec.feature_names == ["x", "mode=0", "mode=1"]
    assert s.test_classes is None  # plain 0/1 labels: no classes beyond the label itself
    kinds = tmp_path / "kinds.csv"
    names = ["Normal.", "DoS", "probe"]
    kinds.write_text("x,label\n" + "".join(f"{i},{names[i % 3]}\n" for i in range(60)))
    s = load_splits(str(kinds))
    assert s.test_labels.sum() == 40
    assert dict(zip(*np.unique(s.test_classes, return_counts=True), strict=True)) == {
        "DoS": 20,
        "Normal": 4,
        "probe": 20,
    }
    assert set(s.test_classes[s.test_labels == 0]) == {"Normal"}
    unlabelled = tmp_path / "u.csv"
    unlabelled.write_text("x,y\n" + "".join(f"{i},{i * 2}\n" for i in range(10)))
    s = load_splits(str(unlabelled))
    assert s.test_labels.sum() == 0 and s.train.shape[1] == 2


def test_csv_log_columns(tmp_path):
    path = make_csv(tmp_path / "m.csv", n_normal=60, n_anomalous=15)
    s = load_splits(str(path), log_columns=["b"])
    prep = s.input_spec.preprocessing
    assert [c.transform for c in prep.columns] == ["none", "log1p", "none"]
    rows = tabular_rows(60, 15)
    normal_b = np.log1p([r["b"] for r in rows if r["label"] == "normal"])
    train_b = s.train[:, 1] * prep.scale[1] + prep.offset[1]
    assert all(np.isclose(b, normal_b, atol=1e-4).any() for b in train_b)
    np.testing.assert_allclose([train_b.min(), s.train[:, 1].max()], [prep.offset[1], 1.0])
    with pytest.raises(DataError, match=r"log-scaled column\(s\) \['colour'\] must be numeric"):
        load_splits(str(path), log_columns=["colour"])
    # a ~ N(0, 1) has negative values: log(1 + v) is refused, naming file and column.
    with pytest.raises(DataError, match="m.csv: column 'a' is log-scaled and needs values >= 0"):
        load_splits(str(path), log_columns=["a"])


def test_csv_errors_name_the_column(tmp_path):
    path = make_csv(tmp_path / "m.csv")
    with pytest.raises(DataError, match="label column 'kind' missing; columns: \\['a'"):
        load_splits(str(path), label_column="kind")
    with pytest.raises(DataError, match=r"symbolic column\(s\) \['shape'\] missing"):
        load_splits(str(path), symbolic_columns=["shape"])
    lines = path.read_text().splitlines()
    lines[4] = "nan,1.0,red,normal"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match="column 'a' has a blank, NaN or Inf value on line 5"):
        load_splits(str(path))
    lines[4] = ",1.0,red,normal"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match="column 'a' has a blank"):
        load_splits(str(path))
    lines[4] = "1.0,red,normal"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match="m.csv: line 5 has 3 fields, header has 4"):
        load_splits(str(path))
    (tmp_path / "x.txt").write_text("a\n1\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_splits(str(tmp_path / "x.txt"))


def test_npz(tmp_path):
    path = make_npz(tmp_path / "d.npz", n_normal=50, n_anomalous=10, features=4)
    s = load_splits(str(path))
    assert s.input_spec.feature_names == [f"sensor_{i}" for i in range(4)]
    assert (len(s.train), len(s.val), len(s.test)) == (35, 5, 10 + 10)
    assert s.test_labels.sum() == 10 and s.test_classes is None
    x = np.load(path)["x"]
    x[3, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    with pytest.raises(DataError, match=r"nan.npz: array 'x' has NaN or Inf at row 3 col 2"):
        load_splits(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "two.npz", a=x, b=x)
    with pytest.raises(DataError, match="no feature array named x"):
        load_splits(str(tmp_path / "two.npz"))
    (tmp_path / "junk.npz").write_bytes(b"PK not a zip")
    with pytest.raises(DataError, match="junk.npz: cannot read NPZ"):
        load_splits(str(tmp_path / "junk.npz"))
