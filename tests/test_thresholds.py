"""Thresholds a production system can act on: ties at the quantile are detected and moved
(or refused), export recalibrates by a quantile or a target false-positive rate on the
exported graph's validation scores, the manifest and GET /models/{name} show the score
distribution it came from; and export's parity check fails as one CLI line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gansentry.cli import main
from gansentry.manifest import Manifest
from tests.data_factories import make_kdd
from tests.fixtures_models import serving
from training.evaluate import cpu_session, run_request, score_batches
from training.onnx_export import PARITY_TOLERANCE, compare
from training.runs import load_run
from training.thresholds import ThresholdError, calibrate, percentile_name

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- calibration


def test_distinct_scores_give_the_plain_quantile() -> None:
    s = np.random.default_rng(0).random(5000)
    t = calibrate(s, quantile=0.99)
    assert t.value == float(np.quantile(s, 0.99)) and t.quantile == 0.99
    assert t.rule == "99th percentile of 5,000 validation-normal scores"
    assert t.validation is not None
    assert t.validation.n == 5000 and t.validation.ties_at_threshold <= 1
    assert t.validation.min == s.min() and t.validation.max == s.max()
    assert t.validation.quantiles["0.99"] == pytest.approx(t.value)
    assert t.validation.flagged_fraction == pytest.approx(0.01, abs=1e-3)
    # A target false-positive rate is the same rule, said the other way.
    f = calibrate(s, target_fpr=0.01)
    assert f.value == t.value and f.target_fpr == 0.01
    assert f.rule == "false-positive rate 0.01 on 5,000 validation-normal scores"


def test_a_tie_at_the_quantile_moves_to_the_side_that_flags_the_asked_rate() -> None:
    """1.2% of the normals tie at 2.0 where the 99th percentile falls: `score > 2.0`
    would flag only the 0.3% above it; the next distinct score below flags 1.5%."""
    rng = np.random.default_rng(1)
    s = np.concatenate([rng.random(9850), np.full(120, 2.0), 3 + rng.random(30)])
    assert np.quantile(s, 0.99) == 2.0 and np.mean(s > 2.0) == pytest.approx(0.003)
    t = calibrate(s, quantile=0.99)
    assert t.value == s[s < 2.0].max()
    assert t.validation is not None and t.validation.flagged_fraction == pytest.approx(0.015)
    assert "120 scores tie at 2" in t.rule and "next distinct score below" in t.rule


def test_a_tie_no_threshold_can_split_is_refused_or_kept_with_a_warning() -> None:
    """Like kdd-ganomaly's: almost every normal scores exactly 0, so no threshold flags
    1% of them."""
    s = np.concatenate([np.zeros(19800), np.linspace(1, 2, 38)])
    with pytest.raises(ThresholdError) as e:
        calibrate(s, quantile=0.99)
    message = str(e.value)
    assert "19,800 of 19,838 validation-normal scores (99.8%) tie at 0" in message
    assert "flags 0.192% of them, not the 1.000% asked" in message and "\n" not in message
    kept = calibrate(s, quantile=0.99, strict=False)  # what training does, with a warning
    assert kept.value == 0.0 and kept.validation.ties_at_threshold == 19800
    # A rate the scores can give is accepted.
    assert calibrate(s, target_fpr=0.002).validation.flagged_fraction == pytest.approx(
        0.0019, abs=1e-4
    )


def test_bad_rules_are_refused() -> None:
    for kwargs in ({}, {"quantile": 0.9, "target_fpr": 0.1}, {"quantile": 1.0}):
        with pytest.raises(ValueError):
            calibrate([1.0, 2.0], **kwargs)
    with pytest.raises(ThresholdError, match="NaN or Inf"):
        calibrate([1.0, float("nan")], quantile=0.5)
    assert percentile_name(0.995) == "99.5th percentile"


def test_export_refuses_to_publish_a_threshold_ties_made_useless() -> None:
    """Training keeps such a threshold (with a warning) so the run is not lost; export
    refuses it by default and names the way out."""
    from training.export import ExportError, _threshold

    val = np.concatenate([np.zeros(19800), np.linspace(1, 2, 38)])
    trained = calibrate(val, quantile=0.99, strict=False)
    with pytest.raises(ExportError, match="run's threshold cannot be served: .*--target-fpr"):
        _threshold(trained, val, None, None)
    fixed = _threshold(trained, val, None, 0.002)
    assert fixed.target_fpr == 0.002 and fixed.value == 0.0


# ---------------------------------------------------------------- parity on what matters


def test_parity_is_judged_at_the_scores_scale_and_by_ranking() -> None:
    rng = np.random.default_rng(2)
    pt = np.concatenate([np.zeros(20), rng.random(44) * 0.02, [1.5]]).astype(np.float32)
    recon = np.zeros((len(pt), 3), np.float32)
    # Nearest-code scores near 0: a slightly different neighbour moves one score by 4e-3,
    # 0.38 of the largest |score| but nothing next to the spread, ranking or decisions.
    ort = pt.copy()
    ort[25] += 4e-4
    p = compare(pt, ort, recon, recon, threshold=0.5)
    assert p.max_rel > 2e-4 and p.problems(PARITY_TOLERANCE) == []
    # A wrong graph inverts rankings and decisions.
    wrong = pt[::-1].copy()
    problems = compare(pt, wrong, recon, recon, threshold=0.5).problems(PARITY_TOLERANCE)
    assert any("rank the other way" in m for m in problems)
    assert any("decision(s) at the threshold differ" in m for m in problems)


def test_parity_scale_survives_half_the_batch_at_zero() -> None:
    """Half the parity batch are validation normals; on a table with repeated records most
    of them repeat a training row, so their nearest-code score is 0 and the batch's
    interquartile range is float32 noise. Such a model's encoder, exact to ~2e-4 in float32,
    must still export (the kdd-memgan case), while a graph off by a tenth still fails."""
    rng = np.random.default_rng(3)
    pt = np.concatenate([np.zeros(34), rng.random(24) * 0.003, 0.05 + rng.random(6) * 0.5]).astype(
        np.float32
    )
    recon = np.zeros((len(pt), 3), np.float32)
    ort = pt + rng.random(len(pt)).astype(np.float32) * 2e-4
    assert compare(pt, ort, recon, recon, threshold=0.0028).problems(PARITY_TOLERANCE) == []
    off = pt.copy()
    off[-6:] += 0.1
    problems = compare(pt, off, recon, recon, threshold=0.0028).problems(PARITY_TOLERANCE)
    assert any("of their spread" in m for m in problems)


# ---------------------------------------------------------------- through export


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("thresholds")
    make_kdd(root / "data" / "kddcup99" / "kddcup.data_10_percent.gz", n=600)
    out = root / "run"
    code = main(
        ["train", "--model", "egbad", "--dataset", "kddcup99", "--data-root", str(root / "data")]
        + ["--epochs", "1", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    return out


def exported_val_scores(run: Path, model_dir: Path) -> np.ndarray:
    _, info = load_run(run)
    val = np.asarray(run_request(info).load().val, dtype=np.float32)
    scores, _ = score_batches(cpu_session(model_dir / "model.onnx", val.shape[1:]), val)
    return scores


async def test_export_threshold_options_policy_and_models_endpoint(run, tmp_path, capsys) -> None:
    models = tmp_path / "models"
    _, info = load_run(run)
    assert info.threshold.validation is not None  # training records the distribution
    assert main(["export", str(run), "--models-dir", str(models), "--name", "t"]) == 0
    kept = Manifest.load(models / "t" / "1").threshold
    assert kept.value == info.threshold.value and kept.rule == info.threshold.rule

    argv = ["export", str(run), "--models-dir", str(models), "--name", "t"]
    assert main([*argv, "--target-fpr", "0.05", "--unknown-policy", "anomaly"]) == 0
    m = Manifest.load(models / "t" / "2")
    val = exported_val_scores(run, models / "t" / "2")
    assert m.threshold == calibrate(
        val, target_fpr=0.05, source="validation-normal scores of the exported graph"
    )
    assert m.threshold.target_fpr == 0.05 and m.threshold.validation.n == len(val)
    assert m.metrics["threshold"] == m.threshold.value
    assert m.input.preprocessing.unknown_policy == "anomaly"
    assert "false-positive rate 0.05" in capsys.readouterr().err

    assert main([*argv, "--threshold-quantile", "0.9"]) == 0
    q = Manifest.load(models / "t" / "3").threshold
    assert q.quantile == 0.9 and q.rule.startswith("90th percentile of")

    async with serving(models) as served:
        r = await served.client.get("/models/t")
        assert r.status_code == 200
        shown = {v["version"]: v for v in r.json()["versions"]}
        assert shown[2]["threshold"] == m.threshold.model_dump(mode="json")
        # Within a factor of 2 of the target on this small validation split.
        assert 0.025 <= shown[2]["threshold"]["validation"]["flagged_fraction"] <= 0.1
        assert shown[2]["input"]["preprocessing"]["unknown_policy"] == "anomaly"

    for bad, text in (
        (["--unknown-policy", "ignore"], "unknown --unknown-policy 'ignore'"),
        (["--target-fpr", "1.5"], "--target-fpr must be in (0, 1)"),
    ):
        assert main([*argv, *bad]) != 0
        assert text in capsys.readouterr().err


def test_forced_parity_failure_is_one_cli_line(run, tmp_path) -> None:
    """Through the real CLI in a subprocess: a parity failure names the model, the
    tolerance and how far off it was, and how to proceed; no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gansentry.cli",
            "export",
            str(run),
            "--models-dir",
            str(tmp_path / "models"),
            "--name",
            "strict",
            "--parity-tolerance",
            "0",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = lines
    assert line.startswith("gansentry export: error: strict: ONNX Runtime differs"), line
    assert "tolerance 0)" in line and "of their spread" in line
    assert "--parity-tolerance" in line
    assert not (tmp_path / "models" / "strict" / "1").exists()
