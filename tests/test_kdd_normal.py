"""The kdd-normal protocol: KDD Cup 99 the other way round from kdd-dagmm, as a network
monitor meets it ("normal." traffic is normal, attacks are the anomalies, 5% of the test
set), on a generated file with the real format."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from gansentry.preprocessing import encode_columns
from tests.data_factories import kdd_rows, make_kdd
from training.data import DataError, load_splits
from training.data.kdd import KDD_FIELDS, KDD_NUMERIC, KDD_SYMBOLIC


def _hashes(x: np.ndarray) -> list[str]:
    return [hashlib.sha1(r.tobytes()).hexdigest() for r in x]


def _columns(rows: list[list[str]]) -> dict[str, np.ndarray]:
    cols = list(zip(*rows, strict=True))
    return {
        name: np.array(cols[i], dtype=np.float64) if name in KDD_NUMERIC else np.array(cols[i])
        for i, name in enumerate(KDD_FIELDS)
        if name in KDD_NUMERIC or name in KDD_SYMBOLIC
    }


def test_kdd_normal_trains_on_normal_traffic_and_tests_on_5_percent_attacks(tmp_path):
    n = 2000
    make_kdd(tmp_path / "kddcup99" / "kddcup.data_10_percent.gz", n=n, seed=3)
    s = load_splits("kddcup99", "kdd-normal", root=tmp_path, split_seed=7)
    assert s.protocol == "kdd-normal" and s.split_seed == 7
    assert s.normal_classes == ["normal"] and "smurf" in s.anomalous_classes
    assert s.input_spec.num_features == 121

    rows = kdd_rows(n, seed=3)
    attack = np.array([r[-1] != "normal." for r in rows])
    where = {
        h: i
        for i, h in enumerate(_hashes(encode_columns(_columns(rows), s.input_spec.preprocessing)))
    }
    train, val, test = ([where[h] for h in _hashes(x)] for x in (s.train, s.val, s.test))
    # Train and validation hold normal traffic only, from one half of the 50/50 split.
    assert not attack[train].any() and not attack[val].any()
    half_a, half_b = train_test_split(np.arange(n), test_size=0.5, random_state=7)
    assert sorted(train + val) == sorted(half_a[~attack[half_a]])
    # The test half keeps its normal records (all but the rounding of the ratio: whole
    # attack records are kept, then the normals that make them 5%) and attacks at 5%.
    assert set(test) <= set(half_b)
    np.testing.assert_array_equal(s.test_labels, attack[test].astype(np.int64))
    assert s.test_labels.mean() == pytest.approx(0.05, abs=0.01)
    n_normal = (~attack[half_b]).sum()
    assert n_normal - 1 / 0.05 <= (s.test_labels == 0).sum() <= n_normal
    assert {str(c) for c in s.test_classes[s.test_labels == 0]} == {"normal"}


def test_kdd_normal_is_refused_for_other_data(tmp_path):
    with pytest.raises(DataError, match="kdd-normal"):
        load_splits("mnist", "kdd-normal", root=tmp_path)
