"""f-AnoGAN through the real training loop: its two phases run in order, each training only
its own networks; a run interrupted inside either phase resumes to exactly the weights and
history of an uninterrupted one; --epochs and --time-budget share the run between the
phases; and a run trained, evaluated and exported with the CLI is served by `/score`, in
process and through Redis, with the scores PyTorch gives. (Shapes, determinism and ONNX
parity are the generic tests' in test_models.py, which run every registered model.)"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from gansentry.cli import main
from gansentry.manifest import ImageInput
from tests.data_factories import make_mnist
from tests.fixtures_redis import ApiProcess, RedisServer, WorkerProcess
from tests.test_train import assert_same_run, image_splits, tabular_splits
from training.models import build_model
from training.models.registry import resolve
from training.runs import CHECKPOINT_DIR, LAST_CHECKPOINT, RunError, load_run, score_array
from training.train import TrainConfig, train

# n_critic 2: the tiny runs have four steps an epoch, and the generator must move in each.
TINY_IMAGE = {"width": 8, "latent_dim": 8, "n_critic": 2, "gan_epochs": 2, "encoder_epochs": 2}
TINY_TABLE = {
    "latent_dim": 4,
    "enc_hidden": [16],
    "gen_hidden": [16],
    "critic_hidden": [16],
    "n_critic": 2,
    "gan_epochs": 2,
    "encoder_epochs": 2,
}
SPLITS = {"image": (image_splits, TINY_IMAGE), "tabular": (tabular_splits, TINY_TABLE)}


def cfg(tmp_path: Path, name: str, kind: str = "image", **kw: object) -> TrainConfig:
    base: dict = dict(
        model="fanogan",
        dataset="x",
        batch_size=32,
        out=tmp_path / name,
        device="cpu",
        hparams=dict(SPLITS[kind][1]),
    )
    return TrainConfig(**{**base, **kw})


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (batch-norm statistics included), copied."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_phases_run_in_order_training_only_their_own_networks(tmp_path):
    seen: list[tuple[str, dict[str, dict[str, torch.Tensor]]]] = []

    def hook(row, model):
        nets = {n: state(getattr(model, n)) for n in ("enc", "gen", "disc")}
        seen.append((row["phase"], nets))

    run = train(cfg(tmp_path, "run"), image_splits(), progress=False, on_epoch=hook)
    _, info = load_run(run)
    assert [r["phase"] for r in info.history] == ["gan", "gan", "encoder", "encoder"]
    assert [phase for phase, _ in seen] == ["gan", "gan", "encoder", "encoder"]
    assert info.epochs_done == 4 and info.hparams["epochs"] == 4
    # gan: G and the critic learn, the encoder waits.
    (_, e1), (_, e2), (_, e3), (_, e4) = seen
    assert same(e1["enc"], e2["enc"])
    assert not same(e1["gen"], e2["gen"]) and not same(e1["disc"], e2["disc"])
    assert "loss_g" in info.history[0] and "loss_izi_f" not in info.history[0]
    # encoder: G (its batch-norm statistics too) and the critic are frozen, E learns.
    for a, b in ((e2, e3), (e3, e4)):
        assert same(a["gen"], b["gen"]) and same(a["disc"], b["disc"])
        assert not same(a["enc"], b["enc"])
    assert "loss_izi_f" in info.history[-1] and "loss_g" not in info.history[-1]
    # The checkpoint comes from the phase that trains the encoder the score needs.
    assert info.selected_epoch in (3, 4)
    metrics = [r["val_selection_metric"] for r in info.history[2:]]
    assert info.selected_epoch == 3 + int(np.argmin(metrics))


@pytest.mark.parametrize(
    ("kind", "stop_after"), [("image", 1), ("image", 3), ("tabular", 1), ("tabular", 3)]
)
def test_resume_inside_either_phase_is_exact(tmp_path, monkeypatch, kind, stop_after):
    """Interrupted after epoch 1 (inside the GAN phase) or 3 (inside the encoder phase)."""
    import training.train as tr

    make = SPLITS[kind][0]
    full = train(cfg(tmp_path, "full", kind, epochs=None), make(), progress=False)

    real, calls = tr._run_epoch, {"n": 0}

    def interrupt(*a, **kw):
        calls["n"] += 1
        if calls["n"] > stop_after:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(tr, "_run_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path, "part", kind), make(), progress=False)
    monkeypatch.setattr(tr, "_run_epoch", real)
    last = torch.load(tmp_path / "part" / CHECKPOINT_DIR / LAST_CHECKPOINT, weights_only=True)
    assert [r["phase"] for r in last["history"]] == ["gan", "gan", "encoder"][:stop_after]
    resumed = train(cfg(tmp_path, "part", kind, resume=True), make(), progress=False)

    assert_same_run(full, resumed)


def test_score_is_the_izi_f_loss_of_pixels_and_critic_features():
    spec = ImageInput(channels=1, height=16, width=16)
    torch.manual_seed(0)
    model = build_model("fanogan", spec, **{**TINY_IMAGE, "score_method": "izi_f"})
    x = torch.as_tensor(image_splits().train[:8])
    model.training_step(x)
    model.start_phase("encoder")
    model.training_step(x)
    model.eval()
    with torch.no_grad():
        score, recon = model.score(x)
        xm = x * 2 - 1  # the networks' range, tanh's
        rec = model.gen(model.enc(xm)[0])
        pixel = (xm - rec).pow(2).mean(dim=(1, 2, 3))
        feature = (model.disc(xm)[1] - model.disc(rec)[1]).pow(2).mean(dim=1)
        torch.testing.assert_close(score, pixel + feature)
        torch.testing.assert_close(recon, (rec + 1) / 2)
        weighted = build_model("fanogan", spec, **{**model.hparams, "kappa": 3.0})
        weighted.load_state_dict(model.state_dict())
        torch.testing.assert_close(weighted.eval().score(x)[0], pixel + 3.0 * feature)
    with pytest.raises(ValueError, match="fanogan has no phase 'critic'"):
        model.start_phase("critic")


def test_epochs_set_the_total_and_the_phases_share_it():
    spec = ImageInput(channels=1, height=32, width=32)
    defaults = resolve("fanogan", spec, {})
    assert defaults["epochs"] == defaults["gan_epochs"] + defaults["encoder_epochs"]
    # --epochs scales the phases in proportion, each keeping at least one epoch.
    for total in (2, 3, 8, 16, 40):
        h = resolve("fanogan", spec, {"epochs": total})
        assert h["gan_epochs"] + h["encoder_epochs"] == total
        assert h["gan_epochs"] >= h["encoder_epochs"] >= 1
    assert resolve("fanogan", spec, {"epochs": 16})["gan_epochs"] == 10
    # Phase counts alone set the total; resolving a run's recorded hparams changes nothing.
    h = resolve("fanogan", spec, {"gan_epochs": 7, "encoder_epochs": 1})
    assert h["epochs"] == 8 and resolve("fanogan", spec, h) == h
    with pytest.raises(ValueError, match=r"epochs=1 for fanogan.*at least 2.*gan, encoder"):
        build_model("fanogan", spec, epochs=1)
    with pytest.raises(ValueError, match="encoder_epochs=0"):
        build_model("fanogan", spec, encoder_epochs=0)


def test_time_budget_is_shared_by_the_phases_and_capped_by_epochs(tmp_path):
    splits = tabular_splits()
    # The smallest budget still trains one epoch of each phase: the last one is selected from.
    tiny = train(cfg(tmp_path, "tiny", "tabular", time_budget=1e-5), splits, progress=False)
    assert [r["phase"] for r in load_run(tiny)[1].history] == ["gan", "encoder"]
    # A budget with room to spare: --epochs caps each phase at its share of them.
    capped = train(
        cfg(tmp_path, "capped", "tabular", epochs=3, time_budget=10.0), splits, progress=False
    )
    assert [r["phase"] for r in load_run(capped)[1].history] == ["gan", "gan", "encoder"]
    with pytest.raises(RunError, match="epochs=1 for fanogan"):
        train(cfg(tmp_path, "one", "tabular", epochs=1), splits, progress=False)


# ---------------------------------------------------------------- CLI, export and serving

NAME = "digits-fanogan"


def cli(capsys, *argv: object) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data root, run, models folder): a generated MNIST trained, evaluated and exported
    with the CLI as a user does it."""
    root = tmp_path_factory.mktemp("fanogan-cli")
    data, run, models = root / "data", root / "run", root / "models"
    make_mnist(data, n_train=600, n_test=60)
    hparams = [f"{k}={json.dumps(v)}" for k, v in TINY_IMAGE.items()]
    argv = ["train", "--model", "fanogan", "--dataset", "mnist", "--normal-class", "3"]
    argv += ["--data-root", data, "--out", run, "--no-progress", "--batch-size", "32"]
    for h in hparams:
        argv += ["--hparam", h]
    assert main([str(a) for a in argv]) == 0
    assert main(["export", str(run), "--models-dir", str(models), "--name", NAME]) == 0
    return data, run, models


def test_cli_trains_evaluates_and_exports(exported, capsys):
    data, run, models = exported
    report = json.loads(cli(capsys, "evaluate", run, "--data-root", data, "--json"))
    assert 0.0 <= report["metrics"]["auroc"] <= 1.0
    served = json.loads(cli(capsys, "evaluate", models / NAME / "1", "--data-root", data, "--json"))
    assert served["metrics"]["auroc"] == pytest.approx(report["metrics"]["auroc"], abs=1e-3)


def test_served_in_process_and_through_redis_with_pytorch_scores(exported, tmp_path):
    _, run, models = exported
    model, info = load_run(run)
    x = np.random.default_rng(5).random((3, *info.input_spec.shape), dtype=np.float32)
    expected, recons = score_array(model, x)
    body = {
        "model": NAME,
        "inputs": [{"array": a.tolist()} for a in x],
        "return_reconstruction": True,
    }

    def check(url: str) -> None:
        r = httpx.post(f"{url}/score", json=body, timeout=60)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        np.testing.assert_allclose([a["score"] for a in results], expected, rtol=1e-4)
        got = np.array([a["reconstruction"] for a in results], dtype=np.float32)
        np.testing.assert_allclose(got, recons, atol=1e-4)

    api = ApiProcess(models, tmp_path).wait_up()
    try:
        check(api.url)
    finally:
        api.stop()

    redis = RedisServer(tmp_path / "redis").start()
    worker = WorkerProcess(redis.url, models, "w0", tmp_path)
    api = ApiProcess(models, tmp_path, redis_url=redis.url)
    try:
        api.wait_up()
        worker.wait_alive()
        check(api.url)
    finally:
        api.stop()
        worker.stop()
        redis.stop()
