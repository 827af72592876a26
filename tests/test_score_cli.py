"""`gansentry score` on a CSV, an NPZ and an image folder gives the scores `POST /score`
gives for the same inputs (real exported ONNX models, the real app over HTTP), writes one
line per input, names bad rows in one error line, and never imports torch."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gansentry.cli import main
from gansentry.manifest import TabularInput
from gansentry.preprocessing import fit_tabular
from tests.fixtures_models import (
    IMAGE_MODEL,
    TABULAR_MODEL,
    ModelRepo,
    b64,
    export_model,
    serving,
    tabular_columns,
)

SENSORS = "sensors"


@pytest.fixture(scope="module")
def sensor_repo(tmp_path_factory) -> Path:
    """An all-numeric tabular model (NPZ rows carry numbers only), EGBAD on 4 sensors."""
    root = tmp_path_factory.mktemp("sensor-models")
    rng = np.random.default_rng(0)
    raw = {f"sensor_{i}": rng.normal(size=64) for i in range(4)}
    prep = fit_tabular(raw, symbolic=[], scaling="minmax")
    spec = TabularInput(
        num_features=prep.num_features, feature_names=prep.feature_names(), preprocessing=prep
    )
    from gansentry.preprocessing import encode_columns

    export_model(root, SENSORS, "egbad", spec, encode_columns(raw, prep), seed=4)
    return root


def score_cli(capsys, *argv: object) -> tuple[int, str, str]:
    code = main(["score", *[str(a) for a in argv], "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def read_scores(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


async def served_scores(root: Path, model: str, inputs: list[dict]) -> list[dict]:
    async with serving(root, max_batch_delay_ms=2) as s:
        r = await s.client.post("/score", json={"model": model, "inputs": inputs})
        assert r.status_code == 200, r.text
        return r.json()["results"]


def traffic_rows(n: int = 40) -> list[dict[str, object]]:
    cols = tabular_columns(n, seed=7)
    return [{k: cols[k][i] for k in cols} for i in range(n)]


async def test_csv_scores_equal_served_scores(capsys, tmp_path, model_repo: ModelRepo):
    rows = traffic_rows()
    table = tmp_path / "flows.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["duration", "protocol", "bytes", "label"])
        w.writerows(
            [r["duration"], r["protocol"], r["bytes"], i % 4 == 0] for i, r in enumerate(rows)
        )
    model_dir = model_repo.root / TABULAR_MODEL / "1"
    code, out, err = score_cli(capsys, model_dir, table, "--out", tmp_path / "s.csv")
    assert code == 0, err
    got = read_scores(tmp_path / "s.csv")
    assert list(got[0]) == ["row", "score", "is_anomaly", "label"]
    assert [g["row"] for g in got] == [str(i) for i in range(len(rows))]
    assert [g["label"] for g in got] == ["1" if i % 4 == 0 else "0" for i in range(len(rows))]
    # The same records as a JSON client sends them: numbers as numbers.
    served = await served_scores(model_repo.root, TABULAR_MODEL, [{"record": r} for r in rows])
    np.testing.assert_allclose(
        [float(g["score"]) for g in got], [s["score"] for s in served], rtol=1e-5, atol=1e-5
    )
    assert [g["is_anomaly"] == "1" for g in got] == [s["is_anomaly"] for s in served]
    assert f"{len(rows)} rows scored by {TABULAR_MODEL}/1" in out
    assert "AUROC " in out and "F1 " in out


async def test_npz_scores_equal_served_scores(capsys, tmp_path, sensor_repo: Path):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(30, 4)), rng.normal(3, 1, size=(6, 4))])
    names = np.array([f"sensor_{i}" for i in range(4)])
    path = tmp_path / "sensors.npz"
    np.savez(path, x=x, feature_names=names)
    code, out, err = score_cli(
        capsys, sensor_repo / SENSORS / "1", path, "--out", tmp_path / "s.csv"
    )
    assert code == 0, err
    got = read_scores(tmp_path / "s.csv")
    assert list(got[0]) == ["row", "score", "is_anomaly"] and len(got) == 36
    records = [{"record": dict(zip(names.tolist(), row.tolist(), strict=True))} for row in x]
    served = await served_scores(sensor_repo, SENSORS, records)
    np.testing.assert_allclose(
        [float(g["score"]) for g in got], [s["score"] for s in served], rtol=1e-5, atol=1e-5
    )
    assert "AUROC" not in out  # no labels, no metrics


def _png(seed: int, size: tuple[int, int], mode: str, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


async def test_image_folder_scores_equal_served_scores(capsys, tmp_path, model_repo: ModelRepo):
    folder = tmp_path / "parts"
    files: dict[str, bytes] = {}
    for i in range(5):
        files[f"normal/{i}.png"] = _png(i, (28, 28), "L")
    files["anomalous/big.jpg"] = _png(9, (50, 40), "RGB", "JPEG")
    files["anomalous/nested/colour.png"] = _png(10, (32, 32), "RGB")
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image")
    model_dir = model_repo.root / IMAGE_MODEL / "2"
    code, out, err = score_cli(capsys, model_dir, folder, "--out", tmp_path / "s.csv")
    assert code == 0, err
    got = read_scores(tmp_path / "s.csv")
    assert list(got[0]) == ["file", "score", "is_anomaly", "label"]
    order = [g["file"] for g in got]
    assert sorted(order) == sorted(files) and len(order) == 7
    assert [g["label"] for g in got] == ["1" if f.startswith("anomalous") else "0" for f in order]
    served = await served_scores(
        model_repo.root, IMAGE_MODEL, [{"image": b64(files[f])} for f in order]
    )
    np.testing.assert_allclose(
        [float(g["score"]) for g in got], [s["score"] for s in served], rtol=1e-5, atol=1e-5
    )
    assert [g["is_anomaly"] == "1" for g in got] == [s["is_anomaly"] for s in served]


def test_bad_rows_are_one_error_line_or_skipped(capsys, tmp_path, model_repo: ModelRepo):
    rows = traffic_rows(6)
    table = tmp_path / "bad.csv"
    lines = ["duration,protocol,bytes"] + [
        f"{r['duration']},{r['protocol']},{'lots' if i == 3 else r['bytes']}"
        for i, r in enumerate(rows)
    ]
    table.write_text("\n".join(lines) + "\n")
    model_dir = model_repo.root / TABULAR_MODEL / "1"
    out_csv = tmp_path / "s.csv"
    code, out, err = score_cli(capsys, model_dir, table, "--out", out_csv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("gansentry score: error: ") and "Traceback" not in err
    assert "bad.csv line 5 (row 3)" in err and "'bytes'" in err and "'lots'" in err
    assert not out_csv.exists()  # a stopped run leaves no half-written output
    code, out, err = score_cli(capsys, model_dir, table, "--out", out_csv, "--skip-bad-rows")
    assert code == 1
    assert "skipped" in err and "row 3" in err and "1 bad rows skipped" in err
    assert [g["row"] for g in read_scores(out_csv)] == ["0", "1", "2", "4", "5"]

    extra = tmp_path / "extra.csv"
    extra.write_text("duration,protocol,bytes,host\n1.0,tcp,10,a\n")
    code, _, err = score_cli(capsys, model_dir, extra, "--out", out_csv)
    assert code == 2 and "row 0" in err and "host" in err, err


@pytest.mark.parametrize(
    ("which", "needle"),
    [
        ("folder-for-table", "takes table rows, not an image folder"),
        ("csv-for-images", "takes images"),
        ("missing", "no such file or folder"),
        ("not-a-model", "no manifest.json"),
    ],
)
def test_wrong_inputs_are_one_error_line(capsys, tmp_path, model_repo: ModelRepo, which, needle):
    table = tmp_path / "t.csv"
    table.write_text("duration,protocol,bytes\n1.0,tcp,10\n")
    (tmp_path / "imgs").mkdir()
    model, data = {
        "folder-for-table": (model_repo.root / TABULAR_MODEL / "1", tmp_path / "imgs"),
        "csv-for-images": (model_repo.root / IMAGE_MODEL / "1", table),
        "missing": (model_repo.root / TABULAR_MODEL / "1", tmp_path / "nope.csv"),
        "not-a-model": (tmp_path, table),
    }[which]
    code, _, err = score_cli(capsys, model, data, "--out", tmp_path / "s.csv")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert needle in err


def test_score_never_imports_torch(tmp_path, model_repo: ModelRepo):
    table = tmp_path / "t.csv"
    table.write_text("duration,protocol,bytes,label\n1.0,tcp,10,0\n2.5,udp,900,1\n")
    model_dir = model_repo.root / TABULAR_MODEL / "1"
    code = (
        "import sys; from gansentry.cli import main; "
        f"rc = main(['score', {str(model_dir)!r}, {str(table)!r}, '--out', "
        f"{str(tmp_path / 's.csv')!r}, '--no-progress']); "
        "print('TORCH', 'torch' in sys.modules, rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH False 0" in proc.stdout, proc.stdout + proc.stderr
    assert len(read_scores(tmp_path / "s.csv")) == 2


def test_undecodable_image_is_named(capsys, tmp_path, model_repo: ModelRepo):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(1, (28, 28), "L"))
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    model_dir = model_repo.root / IMAGE_MODEL / "1"
    code, _, err = score_cli(capsys, model_dir, folder, "--out", tmp_path / "s.csv")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "b.png: cannot decode image" in err
    code, out, err = score_cli(
        capsys, model_dir, folder, "--out", tmp_path / "s.csv", "--skip-bad-rows"
    )
    assert code == 1 and "b.png" in err
    got = read_scores(tmp_path / "s.csv")
    assert [g["file"] for g in got] == ["a.png"] and list(got[0]) == ["file", "score", "is_anomaly"]
