"""Every row of the real KDD Cup 99 kdd-dagmm test split, sent to `POST /score` of a real
`gansentry serve` process as a flow collector sends it (numbers as numbers, KDD's 0/1
flags as the numbers 0 and 1), scores exactly as `gansentry evaluate` scores the split.

A cheap shipped graph (kdd-ganomaly) and requests of 4,096 records keep the 243,250 rows
within about a minute on two cores; the records, not the graph, are what is under test."""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from gansentry.cli import main
from gansentry.manifest import Manifest
from tests.test_service_process import gansentry_serve, wait_ready
from training.evaluate import SCORES_FILE, open_model_dir

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "datasets"
MODEL = "kdd-ganomaly"
REQUEST_SIZE = 4096
FLAGS = ("land", "logged_in", "is_host_login", "is_guest_login")

pytestmark = pytest.mark.skipif(
    not (DATA_ROOT / "kddcup99").is_dir(), reason=f"the KDD Cup 99 file is not in {DATA_ROOT}"
)


def split_rows(model_dir: Path) -> tuple[dict[str, list], np.ndarray]:
    """The raw fields of the kdd-dagmm test split's rows, in test order, and their labels.
    The rows are chosen as `training.data.kdd.kdd_dagmm_splits` chooses them; should that
    ever change, the labels, then the scores, stop matching `gansentry evaluate`'s."""
    from sklearn.model_selection import train_test_split

    from training.data.kdd import (
        ANOMALY_LABEL,
        load_kdd_raw,
        locate_kdd,
        raw_columns,
        subsample_test,
    )

    seed = open_model_dir(model_dir).data.split_seed
    assert seed is not None
    raw = load_kdd_raw(locate_kdd(DATA_ROOT))
    labels = (raw["label"] == ANOMALY_LABEL).astype(np.int64)
    _, test_half = train_test_split(np.arange(len(labels)), test_size=0.5, random_state=seed)
    rows = subsample_test(labels, test_half, seed)
    return {k: v.tolist() for k, v in raw_columns(raw, rows).items()}, labels[rows]


def as_sent(columns: dict[str, list]) -> list[str]:
    """One JSON record per row, typed as flow collectors type them: the text fields as
    strings and every other field, KDD's 0/1 flags included, as a JSON number; integers
    written as integers on even rows and as floats (0.0, 1.0, 181.0) on odd rows, as JSON
    libraries differ on that."""
    names = list(columns)
    out = []
    for i, values in enumerate(zip(*(columns[n] for n in names), strict=True)):
        record: dict[str, object] = {}
        for name, v in zip(names, values, strict=True):
            if name in FLAGS:
                v = float(v)
            if isinstance(v, float) and v.is_integer() and i % 2 == 0:
                v = int(v)
            record[name] = v
        out.append('{"record": ' + json.dumps(record) + "}")
    return out


def test_every_kdd_test_row_scores_through_http_as_evaluate_scores_it(tmp_path: Path) -> None:
    model_dir = REPO / "models" / MODEL / "1"
    report = tmp_path / "report"
    assert main(["evaluate", str(model_dir), "--data-root", str(DATA_ROOT),
                 "--report-dir", str(report), "--json"]) == 0  # fmt: skip
    with open(report / SCORES_FILE) as f:
        offline = [(int(r["label"]), float(r["score"])) for r in csv.DictReader(f)]
    columns, labels = split_rows(model_dir)
    assert [y for y, _ in offline] == labels.tolist()
    records = as_sent(columns)
    assert len(records) == len(offline) == 243_250
    even, odd = (json.loads(r)["record"] for r in records[:2])
    assert all(type(even[f]) is int and type(odd[f]) is float for f in FLAGS)
    assert type(even["protocol_type"]) is str

    repo = tmp_path / "models"
    (repo / MODEL).mkdir(parents=True)
    os.symlink(model_dir, repo / MODEL / "1")
    env = {
        "GANSENTRY_MAX_INPUTS_PER_REQUEST": str(REQUEST_SIZE),
        "GANSENTRY_MAX_BATCH_SIZE": str(REQUEST_SIZE),
        "GANSENTRY_MAX_QUEUE_ITEMS": str(4 * REQUEST_SIZE),
        "GANSENTRY_REQUEST_TIMEOUT_MS": "120000",
        "GANSENTRY_PROVIDERS": "cpu",
    }
    log = tmp_path / "serve.log"
    with (
        gansentry_serve(repo, log, env=env) as (proc, url),
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        wait_ready(proc, url, log)

        def score(start: int) -> list[dict]:
            chunk = ",".join(records[start : start + REQUEST_SIZE])
            body = f'{{"model": "{MODEL}", "version": 1, "inputs": [{chunk}]}}'
            r = client.post("/score", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text[:500]
            return r.json()["results"]

        with ThreadPoolExecutor(2) as pool:
            chunks = list(pool.map(score, range(0, len(records), REQUEST_SIZE)))
    results = [r for chunk in chunks for r in chunk]
    served = np.array([r["score"] for r in results])
    np.testing.assert_allclose(served, [s for _, s in offline], rtol=0, atol=1e-5)
    assert not any("reason" in r for r in results)
    threshold = Manifest.load(model_dir).threshold.value
    assert [r["is_anomaly"] for r in results] == (served > threshold).tolist()
