"""Detection metrics as the papers report them, computed with scikit-learn.

Anomalies are the positive class and a higher score means more anomalous. Two operating
points exist: the run's calibrated threshold (fitted on validation normals, never on the
test set; flags `score > threshold`), and for the kdd-dagmm protocol the papers' own rule,
which flags the top 20% of *test* scores (`score >= 80th percentile`, as in the DAGMM and
EGBAD reference code). The second uses the test scores by design of that protocol, so it is
reported under its own keys and never written back as the model's threshold.

A metric that the test set cannot define is None (null in JSON), never 0.0: without labelled
anomalies there is no recall, F1 or AUROC, and a model trained on a normal-only table must
not read as a broken one. `metrics_note` says why in words, for the manifest's
`metrics_note` and the evaluate output."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

KDD_PROTOCOL = "kdd-dagmm"
TOP_FRACTION = 0.2


def _check(
    scores: np.ndarray, labels: np.ndarray, *, allow_empty: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if scores.size == 0 and not allow_empty:
        raise ValueError("no test samples to evaluate")
    if not np.all(np.isfinite(scores)):
        bad = int(np.count_nonzero(~np.isfinite(scores)))
        raise ValueError(f"{bad} of {scores.size} scores are NaN or infinite")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    return scores, labels.astype(np.int64)


def top_fraction_threshold(scores: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """The kdd-dagmm rule: the (1 - fraction) percentile of the test scores."""
    return float(np.percentile(np.asarray(scores, dtype=np.float64), 100.0 * (1.0 - fraction)))


def at_threshold(
    scores: np.ndarray, labels: np.ndarray, threshold: float, *, inclusive: bool = False
) -> dict[str, float | None]:
    """Precision, recall and F1 of flagging `score > threshold` (`>=` when inclusive); None
    without anomalies in `labels`, where they are undefined. `flagged_fraction` is defined
    whenever there are samples (on normals only, it is the false-positive rate)."""
    scores, labels = _check(scores, labels, allow_empty=True)
    predicted = scores >= threshold if inclusive else scores > threshold
    if not labels.any():
        flagged = float(predicted.mean()) if labels.size else None
        return {"precision": None, "recall": None, "f1": None, "flagged_fraction": flagged}
    p, r, f, _ = precision_recall_fscore_support(
        labels, predicted.astype(np.int64), average="binary", pos_label=1, zero_division=0
    )
    return {
        "precision": float(p),
        "recall": float(r),
        "f1": float(f),
        "flagged_fraction": float(predicted.mean()),
    }


def ranking(scores: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """AUROC and AUPRC (average precision); None when the test set has only one class."""
    scores, labels = _check(scores, labels, allow_empty=True)
    if labels.size == 0 or labels.min() == labels.max():
        return {"auroc": None, "auprc": None}
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
    }


def evaluate_scores(
    scores: np.ndarray, labels: np.ndarray, threshold: float, protocol: str | None
) -> dict[str, float | None]:
    """Every metric for one test set, as the flat dict stored in manifest.json. An empty
    test set (no labelled anomalies and no test table) gives None for every metric."""
    scores, labels = _check(scores, labels, allow_empty=True)
    out: dict[str, float | None] = {
        "n_test": float(labels.size),
        "anomaly_fraction": float(labels.mean()) if labels.size else None,
        **ranking(scores, labels),
        "threshold": float(threshold),
        **at_threshold(scores, labels, threshold),
    }
    if protocol == KDD_PROTOCOL and labels.size:
        top = top_fraction_threshold(scores)
        rule = at_threshold(scores, labels, top, inclusive=True)
        out["top20_threshold"] = top
        out.update({f"top20_{k}": v for k, v in rule.items()})
    return {k: (None if v is not None and math.isnan(v) else v) for k, v in out.items()}


def metrics_note(metrics: dict[str, float | None]) -> str | None:
    """Why some of `evaluate_scores`'s metrics are None, in words for the manifest's
    `metrics_note`; None when every metric is defined."""
    n = metrics.get("n_test")
    fraction = metrics.get("anomaly_fraction")
    if not n:
        return (
            "no test set: the training data had no labelled anomalies and no test table was "
            "given, so AUROC, AUPRC, precision, recall and F1 are undefined; measure them on "
            "a labelled table (gansentry train --test, or gansentry evaluate --dataset)"
        )
    if fraction == 0:
        return (
            f"the test set's {int(n)} samples are all normal (no labelled anomalies), so AUROC, "
            "AUPRC, precision, recall and F1 are undefined; flagged_fraction is its "
            "false-positive rate"
        )
    if fraction == 1:
        return (
            f"the test set's {int(n)} samples are all anomalous, so AUROC and AUPRC are "
            "undefined; recall and flagged_fraction are its detection rate"
        )
    return None


def manifest_metrics(metrics: dict[str, float | None]) -> dict[str, object]:
    """The manifest fields for a test set's metrics: `metrics` and `metrics_note`."""
    return {"metrics": metrics, "metrics_note": metrics_note(metrics)}


def per_class(
    scores: np.ndarray,
    labels: np.ndarray,
    classes: np.ndarray,
    metrics: dict[str, float | None],
) -> list[dict]:
    """How each original test class fares at each operating point in `metrics` (the
    calibrated threshold, and the top-20% rule where reported): an aggregate F1 hides
    *which* normal classes are flagged (KDD: rare attack types that share normal
    traffic's features) and which anomalous ones are missed. One row per (class, label),
    anomalous classes last, larger groups first."""
    scores, labels = _check(scores, labels)
    classes = np.asarray(classes).astype(str).reshape(-1)
    if classes.shape != labels.shape:
        raise ValueError(f"{classes.size} test classes but {labels.size} labels")
    rules = {"threshold": (metrics["threshold"], False)}
    if metrics.get("top20_threshold") is not None:
        rules["top20"] = (metrics["top20_threshold"], True)
    rows = []
    for name in np.unique(classes):
        for label in (0, 1):
            mask = (classes == name) & (labels == label)
            if not mask.any():
                continue
            part, n = scores[mask], int(mask.sum())
            flagged = {
                rule: int(np.count_nonzero(part >= thr if inclusive else part > thr))
                for rule, (thr, inclusive) in rules.items()
            }
            rows.append(
                {
                    "class": str(name),
                    "anomalous": bool(label),
                    "n": n,
                    "median_score": float(np.median(part)),
                    "flagged": {rule: k / n for rule, k in flagged.items()},
                    "errors": {rule: n - k if label else k for rule, k in flagged.items()},
                }
            )
    return sorted(rows, key=lambda r: (r["anomalous"], -r["n"], r["class"]))


def worst_classes(rows: list[dict], limit: int) -> list[dict]:
    """`per_class` rows with any error, the most errors (at either operating point) first."""
    ranked = sorted(rows, key=lambda r: -max(r["errors"].values()))
    return [r for r in ranked if max(r["errors"].values()) > 0][:limit]
