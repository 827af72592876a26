"""A real (tiny) training loop: losses fall, an interrupted run resumes to exactly the
weights and history of an uninterrupted one, selection and threshold use validation
normals only, and bad configurations fail with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gansentry.manifest import ImageInput, TabularInput
from training.data.result import Splits
from training.runs import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    HISTORY_FILE,
    LAST_CHECKPOINT,
    RUN_FILE,
    SELECTED_CHECKPOINT,
    RunError,
    load_run,
    score_array,
)
from training.train import TrainConfig, percentile_name, train

TINY_IMAGE = {"width": 8, "latent_dim": 8}
TINY_BIGAN_TAB = {
    "latent_dim": 4,
    "enc_hidden": [16],
    "gen_hidden": [16],
    "d_x_hidden": 16,
    "d_z_hidden": 16,
    "d_joint_hidden": 16,
}


def blob_images(n: int, seed: int, anomalous: bool = False) -> np.ndarray:
    """Normal images: a bright square near the centre; anomalies: noise."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.1, size=(n, 1, 16, 16)).astype(np.float32)
    if anomalous:
        return rng.uniform(0, 1, size=x.shape).astype(np.float32)
    for i in range(n):
        r, c = rng.integers(4, 7, size=2)
        x[i, 0, r : r + 6, c : c + 6] = 0.9
    return x


def image_splits(test_labels: np.ndarray | None = None) -> Splits:
    test = np.concatenate([blob_images(20, 3), blob_images(20, 4, anomalous=True)])
    labels = np.r_[np.zeros(20), np.ones(20)] if test_labels is None else test_labels
    return Splits(
        train=blob_images(128, 1),
        val=blob_images(40, 2),
        test=test,
        test_labels=labels.astype(np.int64),
        input_spec=ImageInput(channels=1, height=16, width=16),
        dataset="blobs",
        protocol="one-class-normal",
        normal_classes=["blob"],
        anomalous_classes=["noise"],
        split_seed=7,
    )


def tabular_splits() -> Splits:
    rng = np.random.default_rng(0)
    centre = rng.normal(size=6).astype(np.float32)

    def normal(n: int) -> np.ndarray:
        return (centre + 0.1 * rng.normal(size=(n, 6))).astype(np.float32)

    return Splits(
        train=normal(200),
        val=normal(50),
        test=np.concatenate([normal(20), rng.normal(size=(20, 6)).astype(np.float32) * 3]),
        test_labels=np.r_[np.zeros(20), np.ones(20)].astype(np.int64),
        input_spec=TabularInput(num_features=6, feature_names=[f"f{i}" for i in range(6)]),
        dataset="gauss",
        protocol="custom",
        normal_classes=["0"],
        anomalous_classes=["1"],
        split_seed=0,
    )


def cfg(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(
        model="ganomaly",
        dataset="blobs",
        epochs=2,
        batch_size=32,
        out=tmp_path / name,
        device="cpu",
        hparams=dict(TINY_IMAGE),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_ganomaly_reconstruction_loss_falls_and_run_dir_is_complete(tmp_path):
    splits = image_splits()
    run = train(cfg(tmp_path, epochs=6, lr=1e-3, batch_size=16), splits, progress=False)
    history = [json.loads(line) for line in (run / HISTORY_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in history] == list(range(1, 7))
    assert history[-1]["loss_con"] < 0.6 * history[0]["loss_con"]
    for f in (
        CONFIG_FILE,
        RUN_FILE,
        f"{CHECKPOINT_DIR}/{LAST_CHECKPOINT}",
        f"{CHECKPOINT_DIR}/{SELECTED_CHECKPOINT}",
    ):
        assert (run / f).is_file(), f

    model, info = load_run(run)
    assert not model.training and info.epochs_done == 6 and info.arch == "ganomaly"
    # Selection: the epoch with the lowest validation metric, recorded with its rule.
    metrics = [r["val_selection_metric"] for r in history]
    assert info.selected_epoch == int(np.argmin(metrics)) + 1
    assert "validation-normal" in info.selection_rule
    # Threshold: the 99th percentile of the selected model's validation scores.
    val_scores, recon = score_array(model, splits.val)
    assert recon.shape == splits.val.shape
    assert info.threshold.value == pytest.approx(float(np.quantile(val_scores, 0.99)), rel=1e-5)
    assert info.threshold.rule == (
        f"99th percentile of 40 validation-normal scores (epoch {info.selected_epoch})"
    )
    assert info.threshold.calibration_size == 40 and info.threshold.quantile == 0.99
    assert info.training_seconds > 0 and info.peak_memory_mb > 10
    assert info.split_seed == 7 and info.normal_classes == ["blob"]
    assert info.input_spec == splits.input_spec


def test_selection_and_threshold_ignore_test_labels(tmp_path):
    a = load_run(train(cfg(tmp_path, "a"), image_splits(), progress=False))[1]
    flipped = image_splits(test_labels=np.r_[np.ones(20), np.zeros(20)])
    flipped.test = flipped.test[::-1].copy()
    b = load_run(train(cfg(tmp_path, "b"), flipped, progress=False))[1]
    assert a.selected_epoch == b.selected_epoch
    assert a.threshold == b.threshold


def test_epoch_hook_sees_every_epoch_and_leaves_training_alone(tmp_path):
    """benchmarks/epoch_trace.py scores the model after every epoch; doing so must not
    change what the run trains or selects."""
    common = dict(model="egbad", hparams=dict(TINY_BIGAN_TAB), dataset="x", epochs=3)
    seen: list[tuple[dict, bool, np.ndarray]] = []

    def hook(row, model):
        scorer = model.scorer().model  # a fresh copy: draws initial weights
        scorer.fit_score(torch.as_tensor(tabular_splits().train, dtype=torch.float32))
        np.random.rand(3)
        seen.append((row, model.training, score_array(scorer, tabular_splits().test)[0]))

    plain = train(cfg(tmp_path, "plain", **common), tabular_splits(), progress=False)
    hooked = train(
        cfg(tmp_path, "hooked", **common), tabular_splits(), progress=False, on_epoch=hook
    )
    a, ia = load_run(plain)
    b, ib = load_run(hooked)
    assert [r["epoch"] for r, _, _ in seen] == [1, 2, 3]
    assert [r for r, _, _ in seen] == ib.history
    assert not any(training for _, training, _ in seen)
    assert not np.array_equal(seen[0][2], seen[-1][2])  # the model moved between epochs
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    assert ia.selected_epoch == ib.selected_epoch


@pytest.mark.parametrize(
    "arch,splits,hparams",
    [
        ("ganomaly", image_splits, TINY_IMAGE),
        ("egbad", tabular_splits, TINY_BIGAN_TAB),
        ("egbad", tabular_splits, {**TINY_BIGAN_TAB, "w_rec": 0.0}),
        ("memgan", tabular_splits, {**TINY_BIGAN_TAB, "memory_units": 5}),
    ],
)
def test_resume_after_interruption_is_exact(tmp_path, arch, splits, hparams):
    common = dict(model=arch, hparams=dict(hparams), dataset="x")
    full = train(cfg(tmp_path, "full", epochs=4, **common), splits(), progress=False)
    part = cfg(tmp_path, "part", epochs=2, **common)
    train(part, splits(), progress=False)
    resumed = train(
        cfg(tmp_path, "part", epochs=4, resume=True, **common), splits(), progress=False
    )
    assert_same_run(full, resumed)
    assert load_run(resumed)[1].epochs_done == 4


def test_interrupted_epoch_loses_only_that_epoch(tmp_path, monkeypatch):
    import training.train as tr

    calls = {"n": 0}
    real = tr._run_epoch

    def interrupt_third(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(tr, "_run_epoch", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path, epochs=4), image_splits(), progress=False)
    run = tmp_path / "run"
    assert not (run / RUN_FILE).exists()
    assert len((run / HISTORY_FILE).read_text().splitlines()) == 2
    with pytest.raises(RunError, match="not a finished run.*--resume"):
        load_run(run)
    monkeypatch.setattr(tr, "_run_epoch", real)
    train(cfg(tmp_path, epochs=4, resume=True), image_splits(), progress=False)
    assert load_run(run)[1].epochs_done == 4


def test_bad_configs_are_refused_clearly(tmp_path):
    splits = image_splits()
    train(cfg(tmp_path, epochs=1), splits, progress=False)
    with pytest.raises(RunError, match="already holds a finished run; pass --resume"):
        train(cfg(tmp_path, epochs=1), splits, progress=False)
    with pytest.raises(RunError, match=r"differs \(seed: 0 -> 1\)"):
        train(cfg(tmp_path, epochs=2, seed=1, resume=True), splits, progress=False)
    with pytest.raises(RunError, match="unknown model .anogan.; choose one of .*ganomaly"):
        train(cfg(tmp_path, "x", model="anogan"), splits, progress=False)
    with pytest.raises(RunError, match="unknown hyperparameter"):
        train(cfg(tmp_path, "y", hparams={"widht": 3}), splits, progress=False)
    with pytest.raises(RunError, match="threshold_quantile"):
        train(cfg(tmp_path, "z", threshold_quantile=1.5), splits, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(RunError, match="not a run directory"):
        train(cfg(tmp_path, "junk"), splits, progress=False)
    (tmp_path / "run" / CHECKPOINT_DIR / SELECTED_CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(RunError, match="selected.pt: unreadable checkpoint"):
        load_run(tmp_path / "run")
    with pytest.raises(RunError, match="run.json: not found"):
        load_run(tmp_path / "nowhere")


def test_percentile_names():
    assert percentile_name(0.99) == "99th percentile"
    assert percentile_name(0.995) == "99.5th percentile"
    assert percentile_name(0.9) == "90th percentile"
    assert percentile_name(0.92) == "92nd percentile"


TABULAR_EGBAD = dict(model="egbad", dataset="x", hparams=dict(TINY_BIGAN_TAB))


def test_time_budget_trains_the_epochs_that_fit_and_selects_as_usual(tmp_path):
    """No --epochs: the budget alone decides, past the default schedule's epoch count if
    the epochs are short; each epoch starts only if one as long as the previous still
    fits, and training stops once it would not."""
    # The first optimiser step in a process loads parts of torch (seconds on a busy
    # machine): warm up first, so the budgeted run's epochs are its own.
    train(cfg(tmp_path, "warm-up", epochs=1, **TABULAR_EGBAD), tabular_splits(), progress=False)
    budget = 10.0  # seconds; an epoch of this tiny model takes well under one
    run = train(
        cfg(tmp_path, epochs=None, time_budget=budget / 60, **TABULAR_EGBAD),
        tabular_splits(),
        progress=False,
    )
    model, info = load_run(run)
    seconds = [0.0] + [r["seconds"] for r in info.history]
    lengths = [b - a for a, b in zip(seconds, seconds[1:], strict=False)]
    assert info.epochs_done >= 2
    for k in range(1, info.epochs_done):  # epoch k + 1 started: one more still fitted
        assert seconds[k] + lengths[k - 1] <= budget
    assert seconds[-1] + lengths[-1] > budget  # and the next one would not have
    assert info.config["time_budget"] == budget / 60
    metrics = [r["val_selection_metric"] for r in info.history]
    assert info.selected_epoch == int(np.argmin(metrics)) + 1


def test_time_budget_is_capped_by_epochs_and_resumes_with_a_larger_budget(tmp_path):
    splits = tabular_splits()
    kw = dict(TABULAR_EGBAD, epochs=None)
    capped = train(
        cfg(tmp_path, "capped", **{**kw, "epochs": 2}, time_budget=10.0), splits, progress=False
    )
    assert load_run(capped)[1].epochs_done == 2
    # The smallest budget still trains one epoch: a run needs a checkpoint to select.
    first = train(cfg(tmp_path, **kw, time_budget=1e-4), splits, progress=False)
    first_info = load_run(first)[1]
    assert first_info.epochs_done == 1
    # Five more seconds: room for more epochs however busy the machine is.
    more = (first_info.training_seconds + 5.0) / 60
    resumed = train(cfg(tmp_path, **kw, time_budget=more, resume=True), splits, progress=False)
    info = load_run(resumed)[1]
    assert info.epochs_done > 1 and info.config["time_budget"] == more
    assert info.history[0] == first_info.history[0]
    with pytest.raises(RunError, match="time_budget must be positive"):
        train(cfg(tmp_path, "bad", time_budget=0.0), splits, progress=False)


def assert_same_run(full: Path, resumed: Path) -> None:
    """A resumed run ends exactly where an uninterrupted one does: history (less timings),
    selected epoch, weights and optimiser state."""
    a, ia = load_run(full)
    b, ib = load_run(resumed)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in ia.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in ib.history]
    assert ia.selected_epoch == ib.selected_epoch
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    last_a = torch.load(full / CHECKPOINT_DIR / LAST_CHECKPOINT, weights_only=True)
    last_b = torch.load(resumed / CHECKPOINT_DIR / LAST_CHECKPOINT, weights_only=True)
    for name, opt in last_a["model_state"]["optimizers"].items():
        for pid, st in opt["state"].items():
            for key, val in st.items():
                assert torch.equal(
                    val, last_b["model_state"]["optimizers"][name]["state"][pid][key]
                )
