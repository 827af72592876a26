"""`benchmarks/rescore.py`: a finished benchmark run scored with another fitted score gives
the row that training with that score would have given (same weights, calibration and
split), since no model's training or checkpoint selection depends on its score method."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import rescore
    import train_benchmark

    monkeypatch.setattr(train_benchmark, "ROOT", tmp_path)
    monkeypatch.setattr(train_benchmark, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(rescore, "ROOT", tmp_path)
    return train_benchmark, rescore


def test_a_rescored_run_is_the_row_training_with_that_score_gives(bench):
    tb, rs = bench

    def job(hparams: dict) -> dict:
        return {
            "key": tb.job_key("tables", "egbad", "gen-local", 0, hparams),
            "dataset": "tables",
            "protocol": "novelty",
            "model": "egbad",
            "cls": "gen-local",
            "seed": 0,
            "epochs": 1,
            "hparams": hparams,
        }

    target_score = {"score_method": "feature-mahalanobis"}
    source = tb.run_one(job({}))  # the tabular default, the nearest code
    trained = tb.run_one(job(target_score))
    row = rs.rescore(source, target_score)
    assert row["key"] == trained["key"] != source["key"]
    assert row["rescored_from"] == source["key"] and row["hparams"] == target_score
    for metric in ("auroc", "threshold", "f1"):
        assert row["metrics"][metric] == pytest.approx(trained["metrics"][metric], rel=1e-5)
    assert row["metrics"]["auroc"] != pytest.approx(source["metrics"]["auroc"], rel=1e-6)
