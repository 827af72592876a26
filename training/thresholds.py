"""Calibrating the served threshold from validation-normal scores, in one place for
training (`_finish`) and export (`--threshold-quantile` / `--target-fpr`).

The service flags `score > threshold`. A quantile of the validation scores is the right
threshold only when the scores around it are distinct: when many validation normals share
the quantile's value (a score that saturates at 0, or a nearest-code distance that is 0
for every record seen in training), `score > quantile` flags far fewer normals than asked,
and anomalies that score the same value are never flagged. So the threshold is placed on
one side of the tie or the other, whichever flags a share of validation normals closer to
the target false-positive rate (closer in ratio: 0.5% and 2% are equally far from 1%);
when neither side comes within a factor of `MAX_RATE_RATIO` of the target, no threshold
can give that rate and the caller says so."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gansentry.manifest import Threshold, ValidationScores

MAX_RATE_RATIO = 2.0
SUMMARY_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


class ThresholdError(ValueError):
    """No threshold gives the asked false-positive rate on the validation normals."""


def percentile_name(q: float) -> str:
    p = f"{q * 100:.4g}"
    suffix = "th"
    if not p.endswith(("11", "12", "13")):
        suffix = {"1": "st", "2": "nd", "3": "rd"}.get(p[-1], "th")
    return f"{p}{suffix} percentile"


def summarise(scores: np.ndarray, threshold: float) -> ValidationScores:
    """What a reader of /models needs to judge a threshold: the validation-normal score
    distribution it came from, and how many of those scores sit exactly on it."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    return ValidationScores(
        n=int(s.size),
        min=float(s.min()),
        quantiles={f"{q:g}": float(np.quantile(s, q)) for q in SUMMARY_QUANTILES},
        max=float(s.max()),
        ties_at_threshold=int(np.count_nonzero(s == threshold)),
        flagged_fraction=float(np.mean(s > threshold)),
    )


def _ratio(rate: float, target: float) -> float:
    return float("inf") if rate <= 0 else max(rate / target, target / rate)


def calibrate(
    scores: np.ndarray | Sequence[float],
    *,
    quantile: float | None = None,
    target_fpr: float | None = None,
    source: str = "validation-normal scores",
    strict: bool = True,
) -> Threshold:
    """The threshold flagging about `target_fpr` (or 1 - `quantile`) of `scores`. A tie
    at the quantile is resolved as the module says; `strict` raises ThresholdError when
    that still misses the target by more than MAX_RATE_RATIO, otherwise the nearest
    achievable threshold is returned and its `validation.flagged_fraction` shows the rate
    it really gives."""
    if (quantile is None) == (target_fpr is None):
        raise ValueError("give exactly one of a quantile or a target false-positive rate")
    if quantile is not None and not 0 < quantile < 1:
        raise ValueError(f"the threshold quantile must be in (0, 1), got {quantile}")
    if target_fpr is not None and not 0 < target_fpr < 1:
        raise ValueError(f"the target false-positive rate must be in (0, 1), got {target_fpr}")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ThresholdError("no validation-normal scores to calibrate a threshold on")
    if not np.all(np.isfinite(s)):
        bad = int(np.count_nonzero(~np.isfinite(s)))
        raise ThresholdError(f"{bad} of {s.size:,} validation-normal scores are NaN or Inf")
    q = 1.0 - target_fpr if target_fpr is not None else float(quantile)  # type: ignore[arg-type]
    target = 1.0 - q
    value = float(np.quantile(s, q))
    if target_fpr is not None:
        rule = f"false-positive rate {target_fpr:.4g} on {s.size:,} {source}"
    else:
        rule = f"{percentile_name(q)} of {s.size:,} {source}"
    ties = int(np.count_nonzero(s == value))
    if ties > 1:
        below = s[s < value]
        candidates = [value] + ([float(below.max())] if below.size else [])
        best = min(candidates, key=lambda t: _ratio(float(np.mean(s > t)), target))
        rate = float(np.mean(s > best))
        if _ratio(rate, target) > MAX_RATE_RATIO:
            shown = ", ".join(f"{float(np.mean(s > t)):.3%}" for t in candidates)
            message = (
                f"{ties:,} of {s.size:,} {source} ({ties / s.size:.1%}) tie at {value:.6g}, "
                f"so score > threshold flags {shown} of them, not the {target:.3%} asked: "
                "the score does not rank these normals apart. Choose a rate it can give "
                "(--target-fpr) or another score method"
            )
            if strict:
                raise ThresholdError(message)
        if best != value:
            side = "below" if best < value else "at"
            rule += (
                f"; {ties:,} scores tie at {value:.6g}, so the threshold is the next distinct "
                f"score {side} the tie ({rate:.3%} of them flagged)"
            )
        else:
            rule += f"; {ties:,} scores tie at it ({rate:.3%} of them flagged)"
        value = best
    return Threshold(
        value=value,
        rule=rule,
        quantile=q,
        calibration_size=int(s.size),
        target_fpr=target_fpr,
        validation=summarise(s, value),
    )
