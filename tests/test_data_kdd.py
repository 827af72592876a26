"""KDD Cup 99 loader and the DAGMM protocol on generated KDD-format files."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from gansentry.preprocessing import encode_columns, encode_record
from tests.data_factories import kdd_rows, make_kdd
from training.data import DataError, load_splits
from training.data.kdd import KDD_COUNTS, KDD_FIELDS, KDD_NUMERIC, KDD_SYMBOLIC


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GANSENTRY_CACHE", str(tmp_path / "cache"))


def _columns(rows: list[list[str]]) -> dict[str, list]:
    return {
        name: [r[j] if name in KDD_SYMBOLIC else float(r[j]) for r in rows]
        for j, name in enumerate(KDD_FIELDS)
    }


def _hashes(x: np.ndarray) -> list[str]:
    return [hashlib.sha1(r.tobytes()).hexdigest() for r in x]


@pytest.mark.parametrize("gz", [True, False])
def test_kdd_dagmm_protocol(tmp_path, gz):
    name = "kddcup.data_10_percent" + (".gz" if gz else "")
    make_kdd(tmp_path / "kddcup99" / name, n=600)
    s = load_splits("kddcup99", root=tmp_path)
    assert s.protocol == "kdd-dagmm" and s.split_seed == 42
    assert s.anomalous_classes == ["normal"] and "smurf" in s.normal_classes

    # The published 121-feature encoding: 34 numeric + one-hot of 7 symbolic fields.
    prep = s.input_spec.preprocessing
    widths = {c.name: c.width for c in prep.columns if c.kind == "symbolic"}
    assert widths == {
        "protocol_type": 3,
        "service": 66,
        "flag": 11,
        "land": 2,
        "logged_in": 2,
        "is_host_login": 1,
        "is_guest_login": 2,
    }
    assert s.input_spec.num_features == 121 == len(KDD_NUMERIC) + sum(widths.values())
    assert s.train.shape[1] == s.val.shape[1] == s.test.shape[1] == 121
    assert "service=http" in s.input_spec.feature_names

    # Every sample is one of the file's records run through the manifest's preprocessing;
    # train/val hold attacks only, test has exactly 20% "normal." records.
    rows = kdd_rows(600)
    labels = np.array([r[-1] == "normal." for r in rows])
    encoded = encode_columns(_columns(rows), prep)
    where = {h: i for i, h in enumerate(_hashes(encoded))}
    train, val, test = ([where[h] for h in _hashes(x)] for x in (s.train, s.val, s.test))
    assert not labels[train].any() and not labels[val].any()
    np.testing.assert_array_equal(s.test_labels, labels[test].astype(np.int64))
    # Each test record keeps its attack type (the label without the trailing dot).
    assert list(s.test_classes) == [rows[i][-1].rstrip(".") for i in test]
    assert s.test_labels.mean() == pytest.approx(0.2, abs=1e-9)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    # The reference 50/50 split (scikit-learn, seed 42): train + val are exactly the
    # attacks of one half, test comes from the other half.
    half_a, half_b = train_test_split(np.arange(600), test_size=0.5, random_state=42)
    assert sorted(train + val) == sorted(half_a[~labels[half_a]])
    assert set(test) <= set(half_b)
    assert len(val) == round((len(train) + len(val)) * 0.1)

    # Min-max fitted on the train split only, and used: train spans [0, 1] per varying
    # feature while anomalous test records (large byte counts) fall outside it.
    varying = s.train.max(axis=0) > s.train.min(axis=0)
    np.testing.assert_allclose(s.train.min(axis=0)[varying], 0.0, atol=1e-6)
    np.testing.assert_allclose(s.train.max(axis=0)[varying], 1.0, atol=1e-6)
    src = s.input_spec.feature_names.index("src_bytes")
    assert s.test[s.test_labels == 1, src].max() > 1.5
    assert all(c.transform == "none" for c in prep.columns)
    # The service encodes a raw record to the same vector.
    record = dict(zip(KDD_FIELDS, _columns([rows[test[0]]]).values(), strict=True))
    record = {k: v[0] for k, v in record.items()}
    np.testing.assert_allclose(encode_record(record, prep), s.test[0], rtol=1e-6)


def test_kdd_split_is_deterministic_and_seedable(tmp_path):
    path = make_kdd(tmp_path / "kddcup.data_10_percent.gz", n=300)
    a = load_splits(str(path))
    b = load_splits(str(path))
    c = load_splits(str(path), split_seed=1)
    np.testing.assert_array_equal(a.test, b.test)
    assert a.dataset == str(path) and not np.array_equal(a.train, c.train)


def test_kdd_log_columns(tmp_path):
    path = make_kdd(tmp_path / "kddcup.data_10_percent.gz", n=300)
    s = load_splits(str(path), log_columns=["src_bytes", "count"])
    prep = s.input_spec.preprocessing
    assert [c.name for c in prep.columns if c.transform == "log1p"] == ["src_bytes", "count"]
    records = kdd_rows(300)
    train = [i for i, r in enumerate(records) if r[-1] != "normal."]
    encoded = encode_columns(_columns(records), prep)
    where = {h: i for i, h in enumerate(_hashes(encoded))}
    rows = [where[h] for h in _hashes(s.train)]
    assert set(rows) <= set(train)
    raw_src = np.log1p([float(records[i][4]) for i in rows])
    src = prep.feature_names().index("src_bytes")
    np.testing.assert_allclose(
        s.train[:, src], (raw_src - raw_src.min()) / np.ptp(raw_src), rtol=1e-5, atol=1e-6
    )
    assert "src_bytes" in KDD_COUNTS and "serror_rate" not in KDD_COUNTS
    with pytest.raises(DataError, match=r"\['service'\] must be numeric KDD fields"):
        load_splits(str(path), log_columns=["service"])


def test_kdd_encoded_with_a_models_own_preprocessing(tmp_path):
    """Evaluation passes the model's preprocessing: a model trained with log-scaled counts
    is evaluated on log-scaled counts although the loader's default is min-max alone."""
    path = make_kdd(tmp_path / "kddcup.data_10_percent.gz", n=300)
    fitted = load_splits(str(path))
    logged = load_splits(str(path), log_columns=KDD_COUNTS).input_spec.preprocessing
    s = load_splits(str(path), preprocessing=logged)
    assert s.input_spec.preprocessing is logged
    np.testing.assert_array_equal(s.test_labels, fitted.test_labels)
    rows = kdd_rows(300)
    where = {h: i for i, h in enumerate(_hashes(encode_columns(_columns(rows), logged)))}
    assert all(h in where for h in _hashes(s.test))
    assert not np.allclose(s.test, fitted.test)


def test_kdd_max_train(tmp_path):
    path = make_kdd(tmp_path / "kddcup.data_10_percent.gz", n=300)
    assert len(load_splits(str(path), max_train=25).train) == 25


def test_kdd_bad_files_are_named(tmp_path):
    path = tmp_path / "kddcup99" / "kddcup.data_10_percent"
    make_kdd(path, n=100, gz=False)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:5] + [",".join(lines[5].split(",")[:-2])] + lines[6:]))
    with pytest.raises(DataError, match="kddcup.data_10_percent: line 6 has 40 fields"):
        load_splits("kddcup99", root=tmp_path)
    bad = lines[7].split(",")
    bad[4] = "lots"
    path.write_text("\n".join(lines[:7] + [",".join(bad)] + lines[8:]))
    with pytest.raises(DataError, match="field 'src_bytes' is not numeric"):
        load_splits("kddcup99", root=tmp_path)
    bad[4] = "nan"
    path.write_text("\n".join(lines[:7] + [",".join(bad)] + lines[8:]))
    with pytest.raises(DataError, match="field 'src_bytes' contains NaN"):
        load_splits("kddcup99", root=tmp_path)
    path.unlink()
    gz = path.with_name("kddcup.data_10_percent.gz")
    gz.write_bytes(gzip.compress("\n".join(lines).encode())[:200])
    with pytest.raises(DataError, match=r"kddcup.data_10_percent.gz: cannot read"):
        load_splits("kddcup99", root=tmp_path)
    gz.unlink()
    with pytest.raises(DataError, match="KDD Cup 99 10% file not found"):
        load_splits("kddcup99", root=tmp_path)
    make_kdd(gz, n=100)
    with pytest.raises(DataError, match="'one-class-normal' does not apply to kddcup99"):
        load_splits("kddcup99", "one-class-normal", root=tmp_path)
