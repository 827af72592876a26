"""What a production client acts on: `is_anomaly` from `POST /score`, for the latest version
of every shipped model, on real data, with the service's default settings.

    python benchmarks/served_decisions.py ../shared   # writes benchmarks/results/served.json

Starts `gansentry serve` on models/ and sends the inputs over real HTTP:
- MNIST one-class-normal models: 2,000 test digits (200 per digit, fixed seed) as base64 PNGs.
- KDD models (kdd-dagmm: attacks are the normal class, "normal." traffic the anomaly): 6,000
  raw records sampled from the 10% file as `{"record": ...}`, numbers as numbers, as a flow
  collector sends them. Training rows may be among them, so this is optimistic for KDD;
  the manifests' metrics are on the held-out test split.
Prints AUROC and the F1 of `is_anomaly` per model; exits 1 if one is under F1_GOAL (0.90)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

from training.data.kdd import KDD_FIELDS

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "served.json"
F1_GOAL = float(os.environ.get("F1_GOAL", "0.90"))


def _png(a: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def mnist_inputs(shared: pathlib.Path, rng: np.random.Generator):
    mnist = shared / "datasets" / "mnist"
    with gzip.open(mnist / "t10k-images-idx3-ubyte.gz") as f:
        imgs = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28)
    with gzip.open(mnist / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:], np.uint8)
    pick = np.concatenate(
        [rng.choice(np.where(labels == d)[0], 200, replace=False) for d in range(10)]
    )
    return [{"image": _png(imgs[i])} for i in pick], labels[pick]


def _number_or_text(v: str) -> float | str:
    try:
        return float(v)
    except ValueError:
        return v


def kdd_inputs(shared: pathlib.Path, rng: np.random.Generator):
    path = shared / "datasets" / "kddcup99" / "kddcup.data_10_percent.gz"
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()
    rows = [lines[i].split(",") for i in rng.choice(len(lines), 6000, replace=False)]
    # Numbers as numbers, text as text: what a flow collector's JSON holds.
    inputs = [
        {"record": {c: _number_or_text(v) for c, v in zip(KDD_FIELDS, r[:41], strict=True)}}
        for r in rows
    ]
    return inputs, np.array([1 if r[41] == "normal." else 0 for r in rows])


def main(shared: pathlib.Path) -> int:
    rng = np.random.default_rng(0)
    mnist_x, mnist_digit = mnist_inputs(shared, rng)
    kdd_x, kdd_y = kdd_inputs(shared, rng)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["gansentry", "serve", "--host", "127.0.0.1", "--port", str(port)]
    log = open("/tmp/gansentry-served-decisions.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [*cmd, "--models-dir", str(ROOT / "models")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, GANSENTRY_PROVIDERS="cpu"),
        start_new_session=True,
    )
    rows: list[dict] = []
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        for _ in range(240):
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            print("service not ready in 120 s", file=sys.stderr)
            return 1
        for m in client.get("/models").json()["models"]:
            name, version = m["name"], m["latest"]
            info = next(v for v in m["versions"] if v["version"] == version)
            prov = info["provenance"]
            dataset = str(prov.get("dataset", "")).lower()
            if dataset == "mnist" and prov.get("protocol") == "one-class-normal":
                normal = [int(k) for k in prov["normal_classes"]]
                inputs, y = mnist_x, (~np.isin(mnist_digit, normal)).astype(int)
            elif dataset.startswith("kdd") and prov.get("protocol") == "kdd-dagmm":
                inputs, y = kdd_x, kdd_y
            else:
                continue
            scores, flags = [], []
            for i in range(0, len(inputs), 64):
                r = client.post("/score", json={"model": name, "inputs": inputs[i : i + 64]})
                r.raise_for_status()
                scores += [x["score"] for x in r.json()["results"]]
                flags += [x["is_anomaly"] for x in r.json()["results"]]
            rows.append(
                {
                    "model": name,
                    "version": version,
                    "n": len(y),
                    "auroc": round(float(roc_auc_score(y, scores)), 4),
                    "served_f1": round(float(f1_score(y, np.array(flags, int))), 4),
                    "flagged": round(float(np.mean(flags)), 4),
                    "anomaly_rate": round(float(y.mean()), 4),
                }
            )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    for r in rows:
        print(
            f"{r['model']} v{r['version']}: AUROC {r['auroc']:.3f}, served F1 "
            f"{r['served_f1']:.3f} (flagged {r['flagged']:.2f}, true rate {r['anomaly_rate']:.2f})"
        )
    RESULTS.write_text(json.dumps({"f1_goal": F1_GOAL, "rows": rows}, indent=1) + "\n")
    low = [r["model"] for r in rows if r["served_f1"] < F1_GOAL]
    print(f"under F1 {F1_GOAL}: {', '.join(low)}" if low else f"all >= F1 {F1_GOAL}")
    return 1 if low or not rows else 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT.parent / "shared")))
