"""Metrics against hand-computed values and scikit-learn; report pictures on small arrays."""

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from training import report
from training.evaluate import write_report
from training.metrics import (
    at_threshold,
    evaluate_scores,
    per_class,
    ranking,
    top_fraction_threshold,
    worst_classes,
)

# Positives 0.35, 0.8, 0.9; negatives 0.1, 0.4. Pairs ranked right: 5 of 6.
# Ranked by score: + + - + -, so average precision = (1 + 1 + 3/4) / 3.
SCORES = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
LABELS = np.array([0, 0, 1, 1, 1])


def test_ranking_by_hand():
    r = ranking(SCORES, LABELS)
    assert r["auroc"] == pytest.approx(5 / 6)
    assert r["auprc"] == pytest.approx(2.75 / 3)


def test_threshold_is_strict_by_hand():
    # 0.8 and 0.9 are flagged: precision 1, recall 2/3, F1 0.8.
    m = at_threshold(SCORES, LABELS, 0.5)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((1.0, 2 / 3, 0.8))
    assert m["flagged_fraction"] == pytest.approx(0.4)
    # A score equal to the calibrated threshold is not an anomaly (manifest: "above").
    assert at_threshold(SCORES, LABELS, 0.8)["recall"] == pytest.approx(1 / 3)


def test_top20_rule_by_hand():
    scores = np.arange(10, dtype=float)
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 0])
    # 80th percentile of 0..9 (linear interpolation) is 7.2: flags 8 and 9, i.e. 20%.
    assert top_fraction_threshold(scores) == pytest.approx(7.2)
    m = evaluate_scores(scores, labels, threshold=100.0, protocol="kdd-dagmm")
    assert m["top20_threshold"] == pytest.approx(7.2)
    assert m["top20_flagged_fraction"] == pytest.approx(0.2)
    assert (m["top20_precision"], m["top20_recall"], m["top20_f1"]) == pytest.approx(
        (0.5, 0.5, 0.5)
    )
    # The calibrated threshold above every score flags nothing.
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)


def test_top20_rule_only_for_kdd_protocol():
    m = evaluate_scores(SCORES, LABELS, 0.5, "one-class-normal")
    assert not any(k.startswith("top20") for k in m)
    assert m["n_test"] == 5 and m["anomaly_fraction"] == pytest.approx(0.6)


def test_matches_scikit_learn_on_random_scores():
    rng = np.random.default_rng(3)
    labels = (rng.random(500) < 0.3).astype(int)
    scores = rng.normal(size=500) + 1.2 * labels
    thr = float(np.quantile(scores[labels == 0], 0.9))
    m = evaluate_scores(scores, labels, thr, "kdd-dagmm")
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["auprc"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(labels, scores > thr), abs=1e-12)
    top = scores >= np.percentile(scores, 80)
    assert m["top20_f1"] == pytest.approx(f1_score(labels, top), abs=1e-12)


def test_per_class_by_hand():
    # Threshold 0.5 flags 0.6 and 0.9; the top-20% rule (80th percentile 0.66) flags 0.9.
    scores = np.array([0.1, 0.6, 0.2, 0.3, 0.9])
    labels = np.array([0, 0, 0, 1, 1])
    classes = np.array(["a", "a", "b", "x", "x"])
    m = evaluate_scores(scores, labels, 0.5, "kdd-dagmm")
    rows = {(r["class"], r["anomalous"]): r for r in per_class(scores, labels, classes, m)}
    assert list(rows) == [("a", False), ("b", False), ("x", True)]
    assert rows["a", False]["errors"] == {"threshold": 1, "top20": 0}
    assert rows["a", False]["flagged"] == {"threshold": 0.5, "top20": 0.0}
    assert rows["b", False]["errors"] == {"threshold": 0, "top20": 0}
    assert rows["x", True]["errors"] == {"threshold": 1, "top20": 1}
    assert rows["x", True]["median_score"] == pytest.approx(0.6)
    # Classes without errors drop out of the "worst" list; ties keep per_class's order.
    worst = worst_classes(per_class(scores, labels, classes, m), 5)
    assert [r["class"] for r in worst] == ["a", "x"]
    assert [r["class"] for r in worst_classes(list(rows.values()), 1)] == ["a"]
    # Without the kdd-dagmm protocol only the calibrated threshold is broken down.
    plain = per_class(scores, labels, classes, evaluate_scores(scores, labels, 0.5, None))
    assert all(set(r["errors"]) == {"threshold"} for r in plain)
    with pytest.raises(ValueError, match="4 test classes but 5 labels"):
        per_class(scores, labels, classes[:4], m)


def test_one_class_test_set_has_no_auroc():
    r = ranking(np.array([0.1, 0.2]), np.array([0, 0]))
    assert r == {"auroc": None, "auprc": None}


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, float("nan")], [0, 1], "NaN"),
        ([0.1, 0.2, 0.3], [0, 1], "3 scores but 2 labels"),
        ([0.1, 0.2], [0, 2], "labels must be"),
    ],
)
def test_bad_inputs_are_named(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        evaluate_scores(np.array(scores), np.array(labels), 0.5, None)


def _assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100


def test_image_report_pictures(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 10)
    scores = rng.random(30) + labels
    test = rng.random((30, 1, 16, 16)).astype(np.float32)
    recons = np.clip(test + 0.1 * rng.normal(size=test.shape), 0, 1).astype(np.float32)
    m = evaluate_scores(scores, labels, 0.9, "one-class-normal")
    memory = rng.random((12, 1, 16, 16)).astype(np.float32)
    files = write_report(tmp_path, test, recons, scores, labels, m, {"memory_units": memory})
    names = sorted(f.name for f in files)
    assert names == sorted(
        [
            report.ROC_FILE,
            report.HISTOGRAM_FILE,
            report.RECONSTRUCTIONS_FILE,
            report.ANOMALY_MAPS_FILE,
            report.MEMORY_FILE,
        ]
    )
    for f in files:
        _assert_png(f)


def test_colour_and_tabular_report_pictures(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.array([0] * 30 + [1] * 10)
    scores = rng.random(40) + labels
    m = evaluate_scores(scores, labels, 1.0, "kdd-dagmm")
    rgb = rng.random((40, 3, 32, 32)).astype(np.float32)
    for f in write_report(tmp_path / "rgb", rgb, rgb, scores, labels, m, {}):
        _assert_png(f)
    tab = rng.normal(size=(40, 121)).astype(np.float32)
    files = write_report(tmp_path / "tab", tab, tab * 0.9, scores, labels, m, {"memory": tab[:5]})
    assert len(files) == 4
    for f in files:
        _assert_png(f)


def test_pick_examples_takes_both_classes():
    labels = np.array([0] * 50 + [1] * 3)
    idx = report.pick_examples(labels, per_class=8)
    assert list(labels[idx]) == [0] * 8 + [1] * 3
    assert list(idx) == list(report.pick_examples(labels, per_class=8))
