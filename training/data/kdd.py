"""KDD Cup 1999 (the 41-field CSV plus label, gzip or raw) and the DAGMM protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gansentry.manifest import TabularInput, TabularPreprocessing
from gansentry.preprocessing import InputError, encode_columns, fit_tabular
from training.data.cache import cached_arrays
from training.data.errors import DataError
from training.data.idx import read_bytes
from training.data.paths import find_file, missing
from training.data.result import Splits

KDD_FIELDS = [
    "duration",
    "protocol_type",
    "service",
    "flag",
    "src_bytes",
    "dst_bytes",
    "land",
    "wrong_fragment",
    "urgent",
    "hot",
    "num_failed_logins",
    "logged_in",
    "num_compromised",
    "root_shell",
    "su_attempted",
    "num_root",
    "num_file_creations",
    "num_shells",
    "num_access_files",
    "num_outbound_cmds",
    "is_host_login",
    "is_guest_login",
    "count",
    "srv_count",
    "serror_rate",
    "srv_serror_rate",
    "rerror_rate",
    "srv_rerror_rate",
    "same_srv_rate",
    "diff_srv_rate",
    "srv_diff_host_rate",
    "dst_host_count",
    "dst_host_srv_count",
    "dst_host_same_srv_rate",
    "dst_host_diff_srv_rate",
    "dst_host_same_src_port_rate",
    "dst_host_srv_diff_host_rate",
    "dst_host_serror_rate",
    "dst_host_srv_serror_rate",
    "dst_host_rerror_rate",
    "dst_host_srv_rerror_rate",
]
# One-hot encoded as in the EGBAD/DAGMM reference code: the three text fields plus the four
# binary flags. On the 10% file that gives 3 + 66 + 11 + 2 + 2 + 1 + 2 one-hot columns and
# 34 numeric ones: the published 121 features.
KDD_SYMBOLIC = [
    "protocol_type",
    "service",
    "flag",
    "land",
    "logged_in",
    "is_host_login",
    "is_guest_login",
]
KDD_NUMERIC = [f for f in KDD_FIELDS if f not in KDD_SYMBOLIC]
# The heavy-tailed counts, bytes and seconds (all but the *_rate fractions), which
# `--log-columns` may name. Min-max alone stays the default: log-scaling all of them lowered
# EGBAD's and MEMGAN's five-seed top-20% F1 (docs/benchmarks.md).
KDD_COUNTS = [f for f in KDD_NUMERIC if not f.endswith("_rate")]
KDD_NAMES = [
    "kddcup.data_10_percent.gz",
    "kddcup.data_10_percent",
    "kddcup.data_10_percent_corrected",
    "kddcup.data_10_percent_corrected.gz",
]
SUBDIRS = ["kddcup99", "kdd", "kddcup", "."]
ANOMALY_LABEL = "normal"  # the DAGMM protocol's twist: normal traffic is the minority class
TEST_ANOMALY_RATIO = 0.2
# kdd-normal, the other direction: "normal." traffic is normal and attacks are anomalies.
# Attacks are 80% of the file; the test set keeps 5% of them, a rate a network monitor
# meets, which also keeps the test set (and its runtime) near the normal traffic's size.
NORMAL_TEST_ANOMALY_RATIO = 0.05
KDD_PROTOCOLS = ("kdd-dagmm", "kdd-normal")


def locate_kdd(root: Path) -> Path:
    dirs = [(root / d).resolve() for d in SUBDIRS]
    path = find_file(dirs, KDD_NAMES)
    if path is None:
        raise missing("KDD Cup 99 10% file", dirs, KDD_NAMES[:2])
    return path


def parse_kdd(path: Path) -> dict[str, np.ndarray]:
    """Raw columns: `numeric` float64 [N, 34], one str array per symbolic field, `label`."""
    try:
        text = read_bytes(path).decode("ascii")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a KDD Cup 99 CSV (non-ASCII byte at {e.start})") from e
    rows = [line.split(",") for line in text.splitlines() if line.strip()]
    if not rows:
        raise DataError(f"{path}: no records")
    for i, row in enumerate(rows):
        if len(row) != len(KDD_FIELDS) + 1:
            raise DataError(
                f"{path}: line {i + 1} has {len(row)} fields, expected "
                f"{len(KDD_FIELDS)} features and a label"
            )
    cols = list(zip(*rows, strict=True))
    out: dict[str, np.ndarray] = {}
    numeric = np.empty((len(rows), len(KDD_NUMERIC)), dtype=np.float64)
    for j, name in enumerate(KDD_NUMERIC):
        try:
            numeric[:, j] = np.array(cols[KDD_FIELDS.index(name)], dtype=np.float64)
        except ValueError as e:
            raise DataError(f"{path}: field {name!r} is not numeric ({e})") from e
        if not np.all(np.isfinite(numeric[:, j])):
            raise DataError(f"{path}: field {name!r} contains NaN or Inf")
    out["numeric"] = numeric
    for name in KDD_SYMBOLIC:
        out[name] = np.array([v.strip() for v in cols[KDD_FIELDS.index(name)]])
    out["label"] = np.array([v.strip().rstrip(".") for v in cols[-1]])
    return out


def load_kdd_raw(path: Path) -> dict[str, np.ndarray]:
    return cached_arrays("kdd", path, lambda: parse_kdd(path))


def raw_columns(raw: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Field name -> values for the chosen rows, in KDD field order."""
    numeric = raw["numeric"][rows]
    return {
        name: raw[name][rows] if name in KDD_SYMBOLIC else numeric[:, KDD_NUMERIC.index(name)]
        for name in KDD_FIELDS
    }


def subsample_test(
    labels: np.ndarray, rows: np.ndarray, seed: int, ratio: float = TEST_ANOMALY_RATIO
) -> np.ndarray:
    """Keep rows so anomalies make up `ratio` of the test set, dropping surplus
    anomalies (or, when there are too few, surplus normals), then shuffle."""
    rng = np.random.RandomState(seed)
    normal, anomalous = rows[labels[rows] == 0], rows[labels[rows] == 1]
    anomalous = anomalous[rng.permutation(len(anomalous))]
    n_anom = min(len(anomalous), int(len(normal) * ratio / (1 - ratio)))
    n_norm = min(len(normal), round(n_anom * (1 - ratio) / ratio))
    normal = normal[np.sort(rng.permutation(len(normal))[:n_norm])]
    kept = np.concatenate([normal, anomalous[:n_anom]])
    return kept[rng.permutation(len(kept))]


def kdd_dagmm_splits(
    path: Path,
    *,
    split_seed: int,
    val_fraction: float,
    max_train: int | None,
    dataset: str,
    log_columns: list[str] | None = None,
    preprocessing: TabularPreprocessing | None = None,
    protocol: str = "kdd-dagmm",
) -> Splits:
    """DAGMM/EGBAD protocol: "normal." traffic is the anomaly (label 1); a random 50/50
    split; train on the train half's non-anomalies (val carved from them); the test half
    subsampled to 20% anomalies; vocabularies from the whole file (the published 121-feature
    encoding), min-max scaling (of log(1 + v) for `log_columns`) fitted on the train split
    only. `kdd-normal` is the same with the roles swapped: "normal." traffic is normal,
    attacks are the anomaly, subsampled to 5% of the test half."""
    if protocol not in KDD_PROTOCOLS:
        raise DataError(f"unknown KDD protocol {protocol!r}; choose {' or '.join(KDD_PROTOCOLS)}")
    from sklearn.model_selection import train_test_split

    bad = [c for c in log_columns or [] if c not in KDD_NUMERIC]
    if bad:
        raise DataError(
            f"log-scaled column(s) {bad} must be numeric KDD fields, e.g. {', '.join(KDD_COUNTS)}"
        )
    raw = load_kdd_raw(path)
    is_normal_traffic = raw["label"] == ANOMALY_LABEL
    dagmm = protocol == "kdd-dagmm"
    labels = (is_normal_traffic if dagmm else ~is_normal_traffic).astype(np.int64)
    n = len(labels)
    if labels.sum() == 0 or labels.sum() == n:
        raise DataError(f"{path}: needs both 'normal.' and attack records, found only one kind")
    train_half, test_half = train_test_split(np.arange(n), test_size=0.5, random_state=split_seed)
    pool = train_half[labels[train_half] == 0]
    if len(pool) < 2:
        kind = "attack" if dagmm else "normal"
        raise DataError(f"{path}: only {len(pool)} {kind} record(s) in the training half")
    pool = pool[np.random.RandomState(split_seed + 1).permutation(len(pool))]
    n_val = max(1, int(round(len(pool) * val_fraction)))
    val_rows, train_rows = np.sort(pool[:n_val]), np.sort(pool[n_val:])
    if max_train is not None and len(train_rows) > max_train:
        keep = np.random.RandomState(split_seed + 2).permutation(len(train_rows))[:max_train]
        train_rows = np.sort(train_rows[keep])
    ratio = TEST_ANOMALY_RATIO if dagmm else NORMAL_TEST_ANOMALY_RATIO
    test_rows = subsample_test(labels, test_half, split_seed, ratio)

    vocab = {name: sorted(set(raw[name].tolist())) for name in KDD_SYMBOLIC}
    prep = preprocessing or fit_tabular(
        raw_columns(raw, train_rows),
        KDD_SYMBOLIC,
        "minmax",
        vocabularies=vocab,
        log_columns=log_columns or (),
    )
    try:
        train, val, test = (
            encode_columns(raw_columns(raw, r), prep) for r in (train_rows, val_rows, test_rows)
        )
    except InputError as e:
        raise DataError(f"{path}: {e}") from e
    attacks = sorted(set(raw["label"][~is_normal_traffic].tolist()))
    return Splits(
        train=train,
        val=val,
        test=test,
        test_labels=labels[test_rows],
        input_spec=TabularInput(
            num_features=prep.num_features,
            feature_names=prep.feature_names(),
            preprocessing=prep,
        ),
        dataset=dataset,
        protocol=protocol,
        normal_classes=attacks if dagmm else [ANOMALY_LABEL],
        anomalous_classes=[ANOMALY_LABEL] if dagmm else attacks,
        split_seed=split_seed,
        test_classes=raw["label"][test_rows],
    )
