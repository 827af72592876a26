"""`gansentry train|evaluate` on bad input: one error line naming the problem, exit 2,
no traceback; and the commands' argument parsing stays torch-free."""

import json
import subprocess
import sys

import pytest

from gansentry.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, command: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gansentry {command}: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_parsing_does_not_import_torch():
    code = (
        "import sys; from gansentry.cli import build_parser; build_parser(); "
        "import training.cli; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_console_script_reports_unknown_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gansentry.cli", "train", "--model", "vae", "--dataset", "mnist"]
        + ["--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert_one_error_line(proc.returncode, proc.stderr, "train", "unknown model 'vae'", "memgan")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--threshold-quantile", "1.5"], "--threshold-quantile"),
        (["--time-budget", "0"], "--time-budget must be positive"),
    ],
)
def test_train_rejects_bad_options(capsys, tmp_path, extra, needle):
    args = ["train", "--model", "egbad", "--dataset", "mnist", "--out", str(tmp_path / "r")]
    code, _, err = run_cli(capsys, *args, *extra)
    assert_one_error_line(code, err, "train", needle)


def test_evaluate_missing_folder(capsys, tmp_path):
    code, out, err = run_cli(capsys, "evaluate", str(tmp_path / "nope"), "--json")
    assert_one_error_line(code, err, "evaluate", "nope", "no such run or model folder")
    assert out == ""


def test_evaluate_corrupt_manifest_names_the_file(capsys, tmp_path):
    version = tmp_path / "models" / "m" / "1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{not json")
    (version / "model.onnx").write_bytes(b"\x00garbage")
    code, _, err = run_cli(capsys, "evaluate", str(version))
    assert_one_error_line(code, err, "evaluate", "manifest.json")


def test_evaluate_manifest_with_wrong_sha_is_refused(capsys, tmp_path):
    version = tmp_path / "models" / "m" / "1"
    version.mkdir(parents=True)
    manifest = {
        "name": "m",
        "version": 1,
        "architecture": "egbad",
        "input": {"kind": "tabular", "num_features": 2, "feature_names": ["a", "b"]},
        "threshold": {"value": 1.0, "rule": "test"},
        "provenance": {"dataset": "x", "protocol": "custom", "epochs": 1, "seed": 0},
        "onnx": {"sha256": "0" * 64, "opset": 18},
    }
    (version / "manifest.json").write_text(json.dumps(manifest))
    (version / "model.onnx").write_bytes(b"not a graph")
    code, _, err = run_cli(capsys, "evaluate", str(version))
    assert_one_error_line(code, err, "evaluate", "sha256")


@pytest.mark.parametrize(
    ("name", "needle"),
    [("bad/name", "model name 'bad/name'"), (".hidden", "model name '.hidden'")],
)
def test_export_rejects_bad_names_before_touching_disk(capsys, tmp_path, name, needle):
    run = tmp_path / "run"
    run.mkdir()
    models = tmp_path / "models"
    code, _, err = run_cli(capsys, "export", str(run), "--models-dir", str(models), "--name", name)
    assert_one_error_line(code, err, "export", needle)
    assert not models.exists()


def test_export_missing_run(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", str(tmp_path / "gone"), "--name", "m")
    assert_one_error_line(code, err, "export", "gone", "no such run folder")


@pytest.fixture
def datasets(tmp_path):
    from tests.data_factories import make_csv, make_mnist

    make_mnist(tmp_path / "good", n_train=40, n_test=20)
    make_mnist(tmp_path / "corrupt", n_train=40, n_test=20)
    (tmp_path / "corrupt" / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bjunk")
    make_csv(tmp_path / "table.csv")
    (tmp_path / "nan.csv").write_text("a,b,colour,label\n1,2,red,0\n1,nan,red,0\n")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--dataset", "imagenet"], ["dataset 'imagenet'"]),
        (["--dataset", "mnist", "--normal-class", "42", "--data-root", "{d}/good"], ["'42'"]),
        (["--dataset", "mnist", "--normal-class", "3", "--data-root", "{d}/none"], ["not found"]),
        (
            ["--dataset", "mnist", "--normal-class", "3", "--data-root", "{d}/corrupt"],
            ["train-images-idx3-ubyte.gz"],
        ),
        (["--dataset", "{d}/table.csv", "--label-column", "kind"], ["table.csv", "'kind'"]),
        (
            ["--dataset", "{d}/nan.csv", "--label-column", "label", "--symbolic-columns", "colour"],
            ["nan.csv", "'b'"],
        ),
        (["--dataset", "{d}/table.csv", "--log-columns", "a"], ["table.csv", "'a'", ">= 0"]),
        (["--dataset", "{d}/table.csv", "--log-columns", "size"], ["table.csv", "['size']"]),
        (
            ["--dataset", "mnist", "--data-root", "{d}/good", "--log-columns", "a"],
            ["mnist", "tables only"],
        ),
        (["--dataset", "mnist", "--normal-class", "0,1,x", "--data-root", "{d}/good"], ["'x'"]),
        (
            ["--dataset", "mnist", "--normal-class", "0,3,3", "--data-root", "{d}/good"],
            ["'3' is given more than once"],
        ),
        (
            ["--dataset", "mnist", "--normal-class", "0,1,2,3,4,5,6,7,8,9"]
            + ["--data-root", "{d}/good"],
            ["all 10 classes", "at least one class"],
        ),
        (
            ["--dataset", "mnist", "--protocol", "one-class-anomalous", "--normal-class", "1,2"]
            + ["--data-root", "{d}/good"],
            ["takes one anomalous class"],
        ),
    ],
)
def test_train_data_errors_name_the_file_or_field(capsys, datasets, args, needles):
    out = datasets / "run"
    argv = ["train", "--model", "memgan", *[a.format(d=datasets) for a in args], "--out", str(out)]
    code, _, err = run_cli(capsys, *argv)
    assert_one_error_line(code, err, "train", *needles)
    assert not out.exists()


def test_hparam_must_be_key_value(capsys, tmp_path):
    args = ["train", "--model", "egbad", "--dataset", "mnist", "--out", str(tmp_path / "r")]
    code, _, err = run_cli(capsys, *args, "--hparam", "latent_dim")
    assert_one_error_line(code, err, "train", "KEY=VALUE")
