"""Render the Grafana dashboard's panels from a live Prometheus into one PNG, so the docs can
show what the dashboard looks like without a Grafana server.

    python benchmarks/render_dashboard.py --prometheus http://localhost:9090 \
        --minutes 15 --out docs/dashboard.png

Each panel's own PromQL (Grafana variables filled in as Grafana would) is queried over the
window: time series as lines, heatmaps as bucket-by-time images, tables and stats as text."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "gansentry.json"


def promql(expr: str, step_s: float) -> str:
    rate = f"{max(4 * step_s, 60):.0f}s"
    for var, value in {
        "$__rate_interval": rate,
        "$__interval": f"{step_s:.0f}s",
        "$model": ".*",
    }.items():
        expr = expr.replace(var, value)
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt or ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__")
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out.replace("{{", "").replace("}}", "")


def query_range(client: httpx.Client, expr: str, start: float, end: float, step: float) -> list:
    r = client.get(
        "/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}
    )
    r.raise_for_status()
    return r.json()["data"]["result"]


def query(client: httpx.Client, expr: str) -> list:
    r = client.get("/api/v1/query", params={"query": expr})
    r.raise_for_status()
    return r.json()["data"]["result"]


def draw_panel(ax: Any, panel: dict, client: httpx.Client, start: float, end: float, step: float):
    ax.set_title(panel["title"], fontsize=9, loc="left")
    kind = panel["type"]
    if kind in ("table", "piechart"):
        rows = []
        for target in panel["targets"]:
            for r in query(client, promql(target["expr"], step)):
                m = r["metric"]
                if kind == "table":
                    keys = ("model", "version", "architecture", "provider", "job")
                    rows.append("  ".join(m.get(k, "") for k in keys))
                else:
                    rows.append(f"{legend(target.get('legendFormat', ''), m)}: {r['value'][1]}")
        ax.axis("off")
        ax.text(0, 1, "\n".join(rows[:12]) or "No data", va="top", family="monospace", fontsize=7)
        return
    if kind == "heatmap":
        series = query_range(client, promql(panel["targets"][0]["expr"], step), start, end, step)
        les = sorted(series, key=lambda r: float(r["metric"]["le"]))
        if not les:
            ax.text(0.5, 0.5, "No data", ha="center")
            return
        grid = np.array([[float(v) for _, v in r["values"]] for r in les])
        grid = np.diff(
            np.vstack([np.zeros(grid.shape[1]), grid]), axis=0
        )  # cumulative -> per bucket
        ax.imshow(grid, aspect="auto", origin="lower", cmap="Oranges", interpolation="nearest")
        ax.set_yticks(range(len(les)), [r["metric"]["le"] for r in les], fontsize=6)
        ax.set_xticks([])
        return
    for target in panel["targets"]:
        for r in query_range(client, promql(target["expr"], step), start, end, step):
            t = [float(ts) - end for ts, _ in r["values"]]
            v = [float(x) for _, x in r["values"]]
            ax.plot(t, v, lw=1, label=legend(target.get("legendFormat", ""), r["metric"]))
    ax.tick_params(labelsize=6)
    ax.set_xlabel("seconds before now", fontsize=6)
    if ax.lines:
        ax.legend(fontsize=5, loc="upper left")
    else:
        ax.text(0.5, 0.5, "No data", ha="center", transform=ax.transAxes)


def render(prometheus: str, out: Path, minutes: float) -> Path:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 120)
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.4 * cols, 2.8 * rows), layout="constrained", squeeze=False
    )
    with httpx.Client(base_url=prometheus, timeout=30) as client:
        for ax, panel in zip(axes.flat, panels, strict=False):
            draw_panel(ax, panel, client, start, end, step)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{dash['title']} dashboard (rendered from Prometheus, last {minutes:g} min)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prometheus", default="http://localhost:9090")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()
    print(render(args.prometheus, args.out, args.minutes))


if __name__ == "__main__":
    main()
