"""Your own table, your own split: every normal row is trained on except the validation
share, the test set is explicit (`--test`) or said out loud, `--seed` splits own data, the
CLI prints the row counts, metrics without labelled anomalies are null with a reason, and
a run exports from any directory after its CSV is gone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from gansentry.cli import main
from gansentry.manifest import Manifest
from tests.data_factories import make_csv, make_image_folder, make_mnist, make_npz
from training.data import DataError, load_splits
from training.metrics import evaluate_scores, metrics_note

TINY_EGBAD = ["--epochs", "1", "--batch-size", "32", "--no-progress"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GANSENTRY_CACHE", str(tmp_path / "cache"))


def unlabelled_csv(path: Path, n: int = 100, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = "".join(
        f"{a:.6f},{b:.6f},{['x', 'y'][i % 2]}\n" for i, (a, b) in enumerate(rng.normal(size=(n, 2)))
    )
    path.write_text("a,b,kind\n" + rows)
    return path


def _rows(x: np.ndarray) -> set[str]:
    return {hashlib.sha1(r.tobytes()).hexdigest() for r in x}


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- the split itself


def test_unlabelled_table_trains_on_all_but_validation(tmp_path):
    path = unlabelled_csv(tmp_path / "u.csv", n=100)
    s = load_splits(str(path))
    assert s.counts() == {"train": 90, "validation": 10, "test_normal": 0, "test_anomalous": 0}
    s = load_splits(str(path), val_fraction=0.25)
    assert (len(s.train), len(s.val), len(s.test)) == (75, 25, 0)
    assert not _rows(s.train) & _rows(s.val)
    assert any("no test set" in n and "no labelled anomalies" in n for n in s.notes), s.notes


def test_seed_splits_own_data_and_public_splits_stay_fixed(tmp_path):
    path = unlabelled_csv(tmp_path / "u.csv", n=100)
    a, b, a2 = (load_splits(str(path), seed=k) for k in (1, 2, 1))
    assert (a.split_seed, b.split_seed) == (1, 2)
    assert _rows(a.val) != _rows(b.val)
    assert _rows(a.val) == _rows(a2.val)
    assert "split seed 1 (--seed)" in a.notes[0]
    # An explicit split seed wins over the training seed.
    assert _rows(load_splits(str(path), seed=5, split_seed=1).val) == _rows(a.val)
    root = make_mnist(tmp_path / "data", n_train=60, n_test=30)
    m1, m2 = (load_splits("mnist", normal_class=3, root=root, seed=k) for k in (1, 2))
    assert m1.split_seed == m2.split_seed == 0
    assert _rows(m1.val) == _rows(m2.val)
    assert "published fixed split seed 0 (--seed seeds training only)" in m1.notes[-1]


def test_labelled_table_without_test_holds_out_and_says_so(tmp_path):
    path = make_csv(tmp_path / "m.csv", n_normal=60, n_anomalous=15)
    s = load_splits(str(path))
    assert s.counts() == {"train": 42, "validation": 6, "test_normal": 12, "test_anomalous": 15}
    assert any("no --test given" in n and "15 anomalous rows" in n for n in s.notes), s.notes


def test_test_table_is_scored_whole_and_anomalies_are_never_trained_on(tmp_path):
    path = make_csv(tmp_path / "m.csv", n_normal=60, n_anomalous=15)
    test = make_csv(tmp_path / "t.csv", n_normal=30, n_anomalous=10, seed=1)
    s = load_splits(str(path), test=str(test), seed=4)
    # No normal row is lost to a test share: 60 normals = 54 train + 6 validation.
    assert s.counts() == {"train": 54, "validation": 6, "test_normal": 30, "test_anomalous": 10}
    assert s.test_labels.tolist() == [0] * 30 + [1] * 10  # the test table's own order
    # The training table's anomalies (b in [10, 20]) are in neither train nor validation.
    prep = s.input_spec.preprocessing
    b = np.concatenate([s.train, s.val])[:, 1] * prep.scale[1] + prep.offset[1]
    assert b.max() < 10
    assert any("15 anomalous rows" in n and "not used" in n for n in s.notes), s.notes
    # The test table is encoded with the training split's fitting (unseen 'purple' = zeros).
    assert (s.test[s.test_labels == 1][:, 2:] == 0).all()


def test_test_table_errors_name_the_file(tmp_path):
    path = make_csv(tmp_path / "m.csv")
    other = unlabelled_csv(tmp_path / "other.csv")
    with pytest.raises(DataError, match=r"other.csv: symbolic column\(s\) \['colour'\] missing"):
        load_splits(str(path), test=str(other))
    short = tmp_path / "short.csv"
    short.write_text("a,colour,label\n1.0,red,normal\n")
    with pytest.raises(DataError, match=r"short.csv: columns differ .*missing \['b'\]"):
        load_splits(str(path), test=str(short))
    with pytest.raises(DataError, match="--test .*nope.csv: no such file"):
        load_splits(str(path), test=str(tmp_path / "nope.csv"))
    root = make_mnist(tmp_path / "data", n_train=40, n_test=20)
    with pytest.raises(DataError, match="--test applies to your own table"):
        load_splits("mnist", normal_class=3, root=root, test=str(path))


def test_npz_and_image_folder_tests(tmp_path):
    train = make_npz(tmp_path / "d.npz", n_normal=50, n_anomalous=10, features=4)
    test = make_npz(tmp_path / "t.npz", n_normal=20, n_anomalous=5, features=4, seed=3)
    s = load_splits(str(train), test=str(test))
    assert s.counts() == {"train": 45, "validation": 5, "test_normal": 20, "test_anomalous": 5}
    folder = make_image_folder(tmp_path / "imgs", n_normal=20, n_anomalous=0)
    held = make_image_folder(tmp_path / "held", n_normal=5, n_anomalous=3, seed=1)
    s = load_splits(str(folder), test=str(held), val_fraction=0.2)
    assert s.counts() == {"train": 16, "validation": 4, "test_normal": 5, "test_anomalous": 3}


# ---------------------------------------------------------------- metrics without anomalies


def test_metrics_are_null_with_a_reason_never_zero():
    normal_only = evaluate_scores(np.array([0.1, 0.5, 0.9]), np.zeros(3), 0.6, None)
    assert normal_only["auroc"] is None and normal_only["f1"] is None
    assert normal_only["recall"] is None and normal_only["precision"] is None
    assert normal_only["flagged_fraction"] == pytest.approx(1 / 3)
    assert "no labelled anomalies" in metrics_note(normal_only)
    empty = evaluate_scores(np.zeros(0), np.zeros(0), 0.5, "kdd-dagmm")
    assert empty["n_test"] == 0
    assert all(v is None for k, v in empty.items() if k not in ("n_test", "threshold"))
    assert metrics_note(empty).startswith("no test set")
    both = evaluate_scores(np.array([0.1, 0.9]), np.array([0, 1]), 0.5, None)
    assert both["f1"] == 1.0 and metrics_note(both) is None


# ---------------------------------------------------------------- through the CLI


def test_cli_unlabelled_table_prints_counts_and_exports_after_the_csv_is_gone(
    capsys, tmp_path, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    unlabelled_csv(work / "flows.csv", n=120)
    code, out, err = run_cli(
        capsys, "train", "--model", "egbad", "--dataset", "flows.csv", "--out", "runs/f",
        "--seed", "2", "--val-fraction", "0.25", *TINY_EGBAD,
    )  # fmt: skip
    assert code == 0, err
    run = Path(out.strip())
    assert run == (work / "runs" / "f").resolve()
    assert "data: 90 train, 30 validation, 0 test normal, 0 test anomalous" in err
    assert "split seed 2 (--seed)" in err and "no test set" in err
    assert f"run saved in {run}" in err
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == str(work / "flows.csv")  # absolute, whatever the cwd was

    (work / "flows.csv").unlink()
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    code, out, err = run_cli(capsys, "export", "../work/runs/f", "--name", "flows")
    assert code == 0, err
    manifest = Manifest.load(Path(out.strip()))
    assert manifest.metrics["n_test"] == 0
    assert manifest.metrics["auroc"] is None and manifest.metrics["f1"] is None
    assert manifest.metrics_note is not None and "no test set" in manifest.metrics_note
    assert manifest.provenance.hyperparameters["split_seed"] == 2
    assert manifest.provenance.hyperparameters["val_fraction"] == 0.25

    code, out, err = run_cli(capsys, "evaluate", str(run))
    assert code == 0, err
    assert "null metrics: no test set" in out and "f1                       null" in out


def test_cli_test_table_and_evaluate_scores_every_row(capsys, tmp_path):
    train = make_csv(tmp_path / "train.csv", n_normal=150, n_anomalous=20)
    test = make_csv(tmp_path / "test.csv", n_normal=40, n_anomalous=12, seed=1)
    code, out, err = run_cli(
        capsys, "train", "--model", "egbad", "--dataset", train, "--test", test,
        "--out", tmp_path / "run", *TINY_EGBAD,
    )  # fmt: skip
    assert code == 0, err
    assert "data: 135 train, 15 validation, 40 test normal, 12 test anomalous" in err
    assert "20 anomalous rows" in err and "not used" in err
    run = out.strip()

    code, out, err = run_cli(capsys, "evaluate", run, "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"]["n_test"] == 52

    code, out, err = run_cli(capsys, "export", run, "--models-dir", tmp_path / "m", "--name", "t")
    assert code == 0, err
    model = out.strip()
    assert Manifest.load(Path(model)).metrics["n_test"] == 52
    assert Manifest.load(Path(model)).metrics_note is None
    # A table named explicitly is scored whole, never re-split: all 170 training rows.
    code, out, err = run_cli(
        capsys, "evaluate", model, "--dataset", train, "--json", "--report-dir", tmp_path / "r"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["metrics"]["n_test"] == 170
    assert result["metrics"]["anomaly_fraction"] == pytest.approx(20 / 170)
    scored = (tmp_path / "r" / "scores.csv").read_text().splitlines()
    assert len(scored) == 1 + 170


def test_cli_test_on_public_dataset_is_one_error_line(capsys, tmp_path):
    root = make_mnist(tmp_path / "data", n_train=40, n_test=20)
    table = make_csv(tmp_path / "t.csv")
    code, _, err = run_cli(
        capsys, "train", "--model", "egbad", "--dataset", "mnist", "--normal-class", "3",
        "--data-root", root, "--test", table, "--out", tmp_path / "r", *TINY_EGBAD,
    )  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--test applies to your own table" in err and "Traceback" not in err
    code, _, err = run_cli(
        capsys, "train", "--model", "egbad", "--dataset", table, "--val-fraction", "0.7",
        "--out", tmp_path / "r2",
    )  # fmt: skip
    assert code == 2 and "--val-fraction must be between 0 and 0.5" in err


def test_cli_image_folder_with_test_folder_exports_after_both_are_gone(
    capsys, tmp_path, monkeypatch
):
    import shutil

    folder = make_image_folder(tmp_path / "parts", n_normal=30, n_anomalous=4)
    held = make_image_folder(tmp_path / "held", n_normal=6, n_anomalous=5, seed=1)
    code, out, err = run_cli(
        capsys, "train", "--model", "ganomaly", "--dataset", folder, "--test", held,
        "--image-size", "16", "--hparam", "width=8", "--hparam", "latent_dim=8",
        "--out", tmp_path / "run", *TINY_EGBAD,
    )  # fmt: skip
    assert code == 0, err
    assert "data: 27 train, 3 validation, 6 test normal, 5 test anomalous" in err
    assert "4 anomalous images" in err and "not used" in err
    shutil.rmtree(folder)
    shutil.rmtree(held)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "export", "run", "--models-dir", "m", "--name", "parts")
    assert code == 0, err
    manifest = Manifest.load(Path(out.strip()))
    assert manifest.metrics["n_test"] == 11 and manifest.metrics["auroc"] is not None
    assert manifest.metrics_note is None
