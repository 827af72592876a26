"""The evaluation report's pictures (PNG, matplotlib's Agg backend so it runs headless).

Each function writes one file and returns its path; inputs are plain numpy arrays so the
report is the same whether the scores came from PyTorch or from the exported ONNX graph."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from training.metrics import worst_classes  # noqa: E402

ROC_FILE = "roc.png"
HISTOGRAM_FILE = "score_histogram.png"
RECONSTRUCTIONS_FILE = "reconstructions.png"
MEMORY_FILE = "memory_units.png"
PER_CLASS_FILE = "per_class_errors.png"
ANOMALY_MAPS_FILE = "anomaly_maps.png"
MODES_FILE = "modes.png"


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def roc_png(scores: np.ndarray, labels: np.ndarray, auroc: float | None, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    if labels.min() != labels.max():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"AUROC {auroc:.4f}" if auroc is not None else "ROC")
    else:
        ax.text(0.5, 0.5, "test set has one class only", ha="center")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (anomaly = +)")
    ax.legend(loc="lower right")
    return _save(fig, path)


def histogram_png(
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: dict[str, float],
    path: Path,
) -> Path:
    """Normal vs anomalous score distributions with each operating point as a line."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(scores, bins=60)
    for label, name, color in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
        part = scores[labels == label]
        if part.size:
            ax.hist(part, bins=bins, alpha=0.55, density=True, color=color, label=name)
    for (name, value), style in zip(thresholds.items(), ("-", "--", ":"), strict=False):
        ax.axvline(value, color="black", linestyle=style, label=f"{name} {value:.4g}")
    ax.set(xlabel="anomaly score", ylabel="density", title="test scores")
    ax.legend()
    return _save(fig, path)


def per_class_png(rows: list[dict], path: Path, limit: int = 25) -> Path:
    """Error rate of each test class (flagged normals, missed anomalies) at each operating
    point, worst first; `rows` as from `metrics.per_class`."""
    rules = list(rows[0]["flagged"]) if rows else []
    shown = worst_classes(rows, limit) or rows[:1]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(shown) + 1.4))
    y = np.arange(len(shown))
    height = 0.8 / max(1, len(rules))
    names = {"threshold": "calibrated threshold", "top20": "top-20% rule"}
    for i, rule in enumerate(rules):
        rate = [r["errors"][rule] / r["n"] for r in shown]
        ax.barh(y + i * height, rate, height=height, label=names.get(rule, rule))
    labels = [
        f"{r['class']} ({'anomaly' if r['anomalous'] else 'normal class'}, n={r['n']})"
        for r in shown
    ]
    ax.set_yticks(y + height * (len(rules) - 1) / 2, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="error rate (normal: flagged, anomalous: missed)")
    ax.set_title("errors by test class", loc="left")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=7, frameon=False)
    return _save(fig, path)


def _to_hwc(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> [N, H, W] (grey) or [N, H, W, 3] for imshow."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    return images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)


def reconstructions_png(
    inputs: np.ndarray,
    recons: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    path: Path,
) -> Path:
    """Images: each column an input above its reconstruction. Tabular: input rows beside
    reconstructed rows and their absolute difference as heatmaps."""
    if inputs.ndim == 4:
        return _image_pairs(inputs, recons, scores, labels, path)
    return _tabular_heatmaps(inputs, recons, labels, path)


def _image_pairs(
    inputs: np.ndarray, recons: np.ndarray, scores: np.ndarray, labels: np.ndarray, path: Path
) -> Path:
    x, r = _to_hwc(inputs), _to_hwc(recons)
    n = len(x)
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.9), squeeze=False)
    for i in range(n):
        for row, img in enumerate((x[i], r[i])):
            ax = axes[row][i]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        kind = "anom" if labels[i] else "norm"
        axes[0][i].set_title(f"{kind}\n{scores[i]:.3g}", fontsize=7)
    axes[0][0].set_ylabel("input", fontsize=8)
    axes[1][0].set_ylabel("recon", fontsize=8)
    return _save(fig, path)


def anomaly_maps_png(
    inputs: np.ndarray,
    recons: np.ndarray,
    maps: np.ndarray,
    vmax: float,
    scores: np.ndarray,
    labels: np.ndarray,
    path: Path,
) -> Path:
    """Images: each column an input, its reconstruction and its anomaly map, the map in the
    colours `/score` answers with (0 to `vmax`), so a served heat map reads the same."""
    from gansentry.anomaly_map import heatmap

    x, r = _to_hwc(inputs), _to_hwc(recons)
    n = len(x)
    fig, axes = plt.subplots(3, n, figsize=(1.2 * n, 4.2), squeeze=False)
    for i in range(n):
        for row, img in enumerate((x[i], r[i], heatmap(maps[i], vmax))):
            ax = axes[row][i]
            grey = img.ndim == 2
            ax.imshow(
                img,
                cmap="gray" if grey else None,
                vmin=0 if grey else None,
                vmax=1 if grey else None,
            )
            ax.set_xticks([])
            ax.set_yticks([])
        kind = "anom" if labels[i] else "norm"
        axes[0][i].set_title(f"{kind}\n{scores[i]:.3g}", fontsize=7)
    for row, label in enumerate(("input", "recon", "map")):
        axes[row][0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"anomaly maps (colour scale 0 to {vmax:.3g})", fontsize=9)
    return _save(fig, path)


def _tabular_heatmaps(
    inputs: np.ndarray, recons: np.ndarray, labels: np.ndarray, path: Path
) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.25 * len(inputs) + 1.5), sharey=True)
    diff = np.abs(inputs - recons)
    panels = (("input", inputs), ("reconstruction", recons), ("|difference|", diff))
    for ax, (title, data) in zip(axes, panels, strict=True):
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set(title=title, xlabel="feature")
        fig.colorbar(im, ax=ax, fraction=0.04)
    axes[0].set_yticks(range(len(labels)), ["anom" if v else "norm" for v in labels], fontsize=6)
    return _save(fig, path)


def image_grid_png(images: np.ndarray, title: str, path: Path, columns: int = 10) -> Path:
    """A grid of [N, C, H, W] images in [0, 1], e.g. MEMGAN's decoded memory units."""
    x = _to_hwc(images)
    rows = max(1, -(-len(x) // columns))
    cols = min(columns, len(x))
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(x):
            ax.imshow(x[i], cmap="gray" if x[i].ndim == 2 else None, vmin=0, vmax=1)
    fig.suptitle(title)
    return _save(fig, path)


def modes_png(
    real: np.ndarray,
    real_modes: np.ndarray,
    fake: np.ndarray,
    fake_modes: np.ndarray,
    path: Path,
    per_row: int = 6,
) -> Path:
    """A multi-modal model's modes: real normals by the mode the model infers for them,
    beside the samples it generates for that mode (MMOC-GAN's complementary samples).
    Images: one row per mode, normals left, generated samples right. Tables: the first
    two principal components of the normals, normals as dots and generated samples as
    crosses, one colour per mode."""
    modes = int(max(real_modes.max(initial=-1), fake_modes.max(initial=-1))) + 1
    if real.ndim == 4:
        x_real, x_fake = _to_hwc(real), _to_hwc(fake)
        cols = 2 * per_row + 1
        fig, axes = plt.subplots(
            modes, cols, figsize=(0.9 * cols, 0.9 * modes + 0.6), squeeze=False
        )
        for m in range(modes):
            picks = [
                (x_real, np.flatnonzero(real_modes == m)[:per_row], 0),
                (x_fake, np.flatnonzero(fake_modes == m)[:per_row], per_row + 1),
            ]
            for images, idx, first in picks:
                for j, i in enumerate(idx):
                    ax = axes[m, first + j]
                    ax.imshow(
                        images[i], cmap="gray" if images[i].ndim == 2 else None, vmin=0, vmax=1
                    )
            axes[m, 0].set_ylabel(f"mode {m}\n({int((real_modes == m).sum())})", fontsize=7)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
        fig.suptitle("real normals by inferred mode (left) | generated for that mode (right)")
        return _save(fig, path)
    from sklearn.decomposition import PCA

    flat_real = real.reshape(len(real), -1)
    pca = PCA(n_components=2, random_state=0).fit(flat_real)
    p_real, p_fake = pca.transform(flat_real), pca.transform(fake.reshape(len(fake), -1))
    colours = plt.get_cmap("tab10" if modes <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7, 6))
    for m in range(modes):
        r, f = p_real[real_modes == m], p_fake[fake_modes == m]
        ax.scatter(r[:, 0], r[:, 1], s=6, color=colours(m % colours.N), alpha=0.5,
                   label=f"mode {m}: {len(r)} normals")  # fmt: skip
        ax.scatter(f[:, 0], f[:, 1], s=14, marker="x", color=colours(m % colours.N), alpha=0.8)
    ax.set(
        title="normals (dots) by inferred mode, generated samples (x) per mode",
        xlabel="PC 1 of the normals",
        ylabel="PC 2",
    )
    ax.legend(fontsize=7, markerscale=2, loc="best")
    return _save(fig, path)


def matrix_png(matrix: np.ndarray, title: str, path: Path) -> Path:
    """Rows of vectors as a heatmap, e.g. the decoded memory units of a tabular MEMGAN."""
    fig, ax = plt.subplots(figsize=(10, 0.2 * len(matrix) + 1.5))
    im = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set(title=title, xlabel="feature", ylabel="unit")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _save(fig, path)


def pick_examples(labels: np.ndarray, per_class: int = 8, seed: int = 0) -> np.ndarray:
    """Indices of up to `per_class` normal then `per_class` anomalous test samples, chosen
    at random with a fixed seed so reports of the same run are comparable."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in (0, 1):
        idx = np.flatnonzero(labels == label)
        if idx.size:
            picked.append(np.sort(rng.choice(idx, size=min(per_class, idx.size), replace=False)))
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
