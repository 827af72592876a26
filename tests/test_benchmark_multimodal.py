"""The multi-modal normal-class benchmarks: the generated `gen-multimodal` table (clusters of
different sizes, anomalies beside and between them, through the user path) and the
`mnist-multimodal` plan (jobs, splits and its report table)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from tests.data_factories import make_mnist

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def tables(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import tables

    return tables


@pytest.fixture
def bench(tables, monkeypatch, tmp_path):
    import train_benchmark

    monkeypatch.setattr(train_benchmark, "DATA_ROOT", make_mnist(tmp_path, n_train=200))
    return train_benchmark


@pytest.fixture(scope="module")
def multimodal():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import tables
    finally:
        sys.path.remove(str(BENCHMARKS))
    normal, anomalous = tables.generate("gen-multimodal")
    rng = np.random.default_rng(1000 + tables.GENERATED["gen-multimodal"])
    centres, radius = tables.multimodal_clusters(rng)  # generate's first draw
    return tables, normal, anomalous, centres, radius


def test_gen_multimodal_is_reproducible(multimodal):
    tables, normal, anomalous, _, _ = multimodal
    again = tables.generate("gen-multimodal")
    np.testing.assert_array_equal(again[0], normal)
    np.testing.assert_array_equal(again[1], anomalous)
    assert normal.shape == (2000, 8) and np.isfinite(normal).all() and np.isfinite(anomalous).all()


def test_gen_multimodal_clusters_have_clearly_different_sizes(multimodal):
    tables, normal, _, centres, _ = multimodal
    nearest = np.linalg.norm(normal[:, None] - centres[None], axis=2).argmin(axis=1)
    share = np.bincount(nearest, minlength=len(centres)) / len(normal)
    np.testing.assert_allclose(share, tables.MULTIMODAL_WEIGHTS, atol=0.02)
    assert list(np.argsort(-share)) == list(range(len(centres)))  # each smaller than the last
    assert share.max() > 8 * share.min()


def test_gen_multimodal_anomalies_lie_beside_and_between_not_inside(multimodal):
    tables, normal, anomalous, centres, radius = multimodal
    spreads = tables.MULTIMODAL_SPREADS
    to_centre = np.linalg.norm(anomalous[:, None] - centres[None], axis=2)
    # Outside every cluster: beyond the radius holding 99.9% of its rows (which ~all
    # normals are within) by at least half a standard deviation.
    assert np.all(to_centre > radius + 0.5 * spreads)
    own = np.linalg.norm(normal[:, None] - centres[None], axis=2)
    assert np.mean(own.min(axis=1) <= radius[own.argmin(axis=1)]) > 0.998
    # Both kinds, about half each: just beside a cluster, or far from all (between two).
    beside = np.any(to_centre < radius + 2.01 * spreads, axis=1)
    assert 0.4 < beside.mean() < 0.6
    assert np.all(to_centre[~beside] > radius + 3 * spreads.max())
    # Nearest neighbours: every anomaly sits in sparser surroundings than the normal row
    # nearest to it (its 5th-nearest normal is farther away than that row's), most of them
    # by far.
    k = 5
    nn = NearestNeighbors(n_neighbors=k + 1).fit(normal)
    normal_kth = nn.kneighbors(normal)[0][:, k]  # column 0 is the row itself
    dist, idx = nn.kneighbors(anomalous, n_neighbors=k)
    ratio = dist[:, k - 1] / normal_kth[idx[:, 0]]
    assert ratio.min() > 1 and np.median(ratio) > 2


def test_gen_multimodal_goes_through_the_user_path(tables, monkeypatch, tmp_path):
    monkeypatch.setattr(tables, "FILES", tmp_path)
    s = tables.table_splits("gen-multimodal", 0, tmp_path)
    assert s.protocol == "custom" and s.dataset == "gen-multimodal"
    assert (tmp_path / "gen-multimodal-seed0" / "normal.npz").exists()
    # 30% of the 2,000 normals tested, anomalies at 3% of the test set: few and imbalanced.
    assert len(s.test_labels) == 619 and s.test_labels.sum() == 19
    assert len(s.train) + len(s.val) == 1400
    other = tables.table_splits("gen-multimodal", 1, tmp_path)
    assert not np.array_equal(other.test, s.test)  # the split varies with the seed


def test_plans_run_the_multimodal_benchmarks(bench):
    def jobs(*plan: str, tables=None):
        args = argparse.Namespace(
            plan=list(plan),
            classes=None,
            tables=tables,
            seeds=[0, 1],
            models=["mmocgan", "iforest"],
            epochs=None,
            hparams={},
        )
        return bench.plan_jobs(args)

    mm = jobs("mnist-multimodal")
    assert {(j["cls"], j["seed"], j["model"]) for j in mm} == {
        (c, s, m)
        for c in ("0,1,2,3,4", "5,6,7,8,9")
        for s in (0, 1)
        for m in ("mmocgan", "iforest")
    }
    assert {j["protocol"] for j in mm} == {"one-class-normal"}
    assert "mnist/mmocgan/0,1,2,3,4/seed0" in {j["key"] for j in mm}
    tab = jobs("tables", tables=["gen-multimodal"])
    assert {j["cls"] for j in tab} == {"gen-multimodal"} and len(tab) == 4
    assert "gen-multimodal" in {j["cls"] for j in jobs("tables")}
    s = bench.job_splits("mnist", "one-class-normal", "5,6,7,8,9")
    assert s.normal_classes == ["5", "6", "7", "8", "9"] and s.train.shape[1:] == (1, 32, 32)


def _row(model: str, cls: str, seed: int, auroc: float, dataset: str = "mnist") -> dict:
    return {
        "key": f"{dataset}/{model}/{cls}/seed{seed}",
        "dataset": dataset,
        "protocol": "novelty" if dataset == "tables" else "one-class-normal",
        "model": model,
        "cls": cls,
        "seed": seed,
        "metrics": {"auroc": auroc, "f1": 0.5},
        "train_seconds": 10.0 + seed,
        "peak_memory_mb": 300.0,
        "epochs": 15 if model == "mmocgan" else None,
    }


def test_report_renders_the_multimodal_table(bench):
    rows = [
        _row("mmocgan", "0,1,2,3,4", 0, 0.80),
        _row("mmocgan", "0,1,2,3,4", 1, 0.90),
        _row("mmocgan", "0,1,2,3,4", 6, 0.10),  # development seed: not in the table
        _row("mmocgan", "5,6,7,8,9", 0, 0.70),
        _row("iforest", "0,1,2,3,4", 0, 0.60),
        _row("mmocgan", "3", 0, 0.95),
        _row("mmocgan", "3", 5, 0.15),  # development seed: not in the per-digit table
        _row("iforest", "gen-multimodal", 0, 0.94, dataset="tables"),
    ]
    text = bench.report(rows)
    lines = text.splitlines()
    at = lines.index("### MNIST with a multi-modal normal class (mnist-multimodal plan)")
    table = [line for line in lines[at:] if line.startswith("| ")]
    assert table[0] == "| model | 0-4 normal | 5-9 normal | one-class mean |"
    assert table[1] == "| mmocgan | 0.850 ± 0.071 (2) | 0.700 (1) | 0.950 |"
    assert table[2] == "| iforest | 0.600 (1) | - | - |"
    assert "development seeds (5 and up)" in text
    # Multi-digit rows and development seeds stay out of the per-digit table; multi-digit
    # rows get their own timing line.
    per_digit = lines[lines.index("### mnist one-class-normal: AUROC per normal class") :]
    assert next(x for x in per_digit if x.startswith("| mmocgan")).count("0.950") == 2
    assert "| mnist-multimodal | mmocgan | 2-core CPU | 4 | 15 |" in text
    assert "| mnist | mmocgan | 2-core CPU | 2 | 15 |" in text
    assert "gen-multimodal" in text and "0.940 (1)" in text


def test_gpu_rows_get_their_own_time_line(bench):
    """A row trained on a GPU counts in the accuracy tables like any run of the same
    settings, but its seconds are not the 2-core budget: the time table keeps it apart."""
    gpu = {**_row("mmocgan", "0,1,2,3,4", 1, 0.90), "device": "NVIDIA H200", "train_seconds": 1.0}
    text = bench.report([_row("mmocgan", "0,1,2,3,4", 0, 0.80), gpu])
    assert "| mmocgan | 0.850 ± 0.071 (2) |" in text
    assert "| mnist-multimodal | mmocgan | 2-core CPU | 1 | 15 | 10 | 10-10 | 300 |" in text
    assert "| mnist-multimodal | mmocgan | NVIDIA H200 | 1 | 15 | 1 | 1-1 | 300 |" in text


def test_rescored_rows_stay_out_of_the_time_table(bench):
    """A rescored row carries its source's training seconds; counting it again would show
    a variant that never trained, and the source's jobs twice."""
    source = _row("mmocgan", "0,1,2,3,4", 0, 0.80)
    rescored = {
        **_row("mmocgan", "0,1,2,3,4", 0, 0.85),
        "hparams": {"knn_components": 0},
        "key": "mnist/mmocgan/0,1,2,3,4/seed0/knn_components=0",
        "rescored_from": source["key"],
    }
    text = bench.report([source, rescored])
    assert "| mmocgan (knn_components=0) | 0.850 (1) |" in text  # in the accuracy table
    assert "| mnist-multimodal | mmocgan | 2-core CPU | 1 | 15 |" in text
    assert "| mnist-multimodal | mmocgan (knn_components=0) |" not in text
