"""The model repository on disk (`models/NAME/VERSION/{model.onnx,manifest.json}`) as
loaded ONNX Runtime sessions.

A model is served only after its manifest parses, its sha256 matches, its graph honours
the I/O contract and one real forward pass succeeds. A broken model is refused with one
log line while the rest are served; a failed reload keeps the old version serving."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gansentry.contract import (
    ANOMALY_MAP_NAME,
    INPUT_NAME,
    MODEL_FILE,
    RECONSTRUCTION_NAME,
    SCORE_NAME,
    ContractError,
    check_io,
)
from gansentry.manifest import Manifest, ModelFolderError, load_verified, sha256_file
from service import metrics
from service.batching.base import ModelRef
from service.providers import ProviderError, create_session
from service.settings import Settings

log = logging.getLogger(__name__)


class ModelNotFound(LookupError):
    """Unknown model name or version: answered 404."""


class ModelLoadError(Exception):
    pass


@dataclass
class LoadedModel:
    ref: ModelRef
    manifest: Manifest
    directory: Path
    session: ort.InferenceSession
    provider: str
    sha256: str

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.manifest.input.shape

    @property
    def threshold(self) -> float:
        return self.manifest.threshold.value

    @property
    def has_anomaly_map(self) -> bool:
        return self.manifest.has_anomaly_map

    @property
    def has_reconstruction(self) -> bool:
        return self.manifest.has_reconstruction

    def infer(
        self, x: np.ndarray, reconstruction: bool = True, anomaly_map: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """One ONNX Runtime call on a batch: scores, and reconstructions and anomaly maps
        if asked and the model has them (None otherwise). Thread-safe (ORT's Run is). Only
        what is asked for is fetched: on a GPU the reconstructions are nearly all the bytes
        copied back to the host, and most callers never ask for them."""
        names = [SCORE_NAME]
        if reconstruction and self.has_reconstruction:
            names.append(RECONSTRUCTION_NAME)
        if anomaly_map and self.has_anomaly_map:
            names.append(ANOMALY_MAP_NAME)
        outputs = self.session.run(names, {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
        got = dict(zip(names, outputs, strict=True))
        return outputs[0].reshape(-1), got.get(RECONSTRUCTION_NAME), got.get(ANOMALY_MAP_NAME)

    def run(
        self, x: np.ndarray, reconstruction: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """`infer` without anomaly maps."""
        scores, recons, _ = self.infer(x, reconstruction)
        return scores, recons

    def run_observed(
        self, x: np.ndarray, reconstruction: bool = True, anomaly_map: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """`infer` for a served batch: records its size and ONNX Runtime time, the same way
        in the embedded batcher and in a Redis worker."""
        started = time.perf_counter()
        outputs = self.infer(x, reconstruction, anomaly_map)
        metrics.INFERENCE_LATENCY.labels(self.ref.name, self.provider).observe(
            time.perf_counter() - started
        )
        metrics.BATCH_SIZE.labels(self.ref.name).observe(len(x))
        return outputs


def load_model(directory: Path, settings: Settings) -> LoadedModel:
    """Load and verify one `models/NAME/VERSION` folder, or raise ModelLoadError."""
    try:
        manifest = load_verified(directory)
    except ModelFolderError as e:
        raise ModelLoadError(str(e)) from e
    name, version = directory.parent.name, directory.name
    if manifest.name != name or str(manifest.version) != version:
        raise ModelLoadError(
            f"manifest says {manifest.name}/{manifest.version} but the folder is {name}/{version}"
        )
    onnx_path = directory / MODEL_FILE
    shape = manifest.input.shape
    try:
        session, provider = create_session(onnx_path, settings, shape)
    except ProviderError:
        raise
    except Exception as e:  # ORT raises its own exception types for corrupt graphs
        raise ModelLoadError(f"ONNX Runtime cannot load {MODEL_FILE}: {e}") from e
    try:
        check_io(session.get_inputs(), session.get_outputs(), shape)
    except ContractError as e:
        raise ModelLoadError(f"I/O contract: {e}") from e
    graph_outputs = {o.name for o in session.get_outputs()}
    undeclared = [o for o in manifest.outputs if o not in graph_outputs]
    if undeclared:
        raise ModelLoadError(
            f"the manifest lists output(s) {', '.join(undeclared)} that {MODEL_FILE} lacks"
        )
    model = LoadedModel(
        ModelRef(name, int(version)), manifest, directory, session, provider, manifest.onnx.sha256
    )
    try:
        score, recon, amap = model.infer(
            np.zeros((1, *shape), np.float32), anomaly_map=model.has_anomaly_map
        )
    except Exception as e:
        raise ModelLoadError(f"test inference failed: {e}") from e
    if score.shape != (1,):
        raise ModelLoadError(f"test inference gave score {score.shape}, expected (1,)")
    if recon is not None and recon.shape != (1, *shape):
        raise ModelLoadError(
            f"test inference gave a reconstruction of shape {recon.shape}, expected {(1, *shape)}"
        )
    if amap is not None and amap.shape != (1, *shape[1:]):
        raise ModelLoadError(
            f"test inference gave an anomaly map of shape {amap.shape}, expected {(1, *shape[1:])}"
        )
    return model


@dataclass
class Registry:
    """All versions of all models. Reads are lock-free (a dict swap on reload).

    `routable` says whether the batching backend can compute a version now. "Latest" is
    the highest version that is both loaded here and routable: through Redis a version
    this API just loaded is routable only once a live worker advertises it, so a reload
    never sends unpinned requests to a version no worker serves yet."""

    models_dir: Path
    settings: Settings
    models: dict[str, dict[int, LoadedModel]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    routable: Callable[[ModelRef], bool] | None = field(default=None, repr=False)
    _reload_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self) -> Registry:
        self.reload()
        return self

    def reload(self) -> dict[str, str]:
        """Rescan the repository. Unchanged versions keep their sessions; a version that
        no longer loads keeps serving its previous copy. Returns the errors by NAME/VERSION."""
        with self._reload_lock:
            new: dict[str, dict[int, LoadedModel]] = {}
            errors: dict[str, str] = {}
            for directory in sorted(self._version_dirs()):
                key = f"{directory.parent.name}/{directory.name}"
                old = self.models.get(directory.parent.name, {}).get(int(directory.name))
                try:
                    if old is not None and sha256_file(directory / MODEL_FILE) == old.sha256:
                        if Manifest.load(directory) == old.manifest:
                            model = old
                        else:
                            model = load_model(directory, self.settings)
                    else:
                        model = load_model(directory, self.settings)
                except ProviderError:
                    raise
                except (ModelLoadError, OSError, ValueError) as e:
                    errors[key] = str(e)
                    log.error("refusing model %s: %s", key, e)
                    if old is None:
                        continue
                    log.warning("keeping the previously loaded %s serving", key)
                    model = old
                new.setdefault(model.ref.name, {})[model.ref.version] = model
            self.models, self.errors = new, errors
            loaded = [f"{m.ref.key} ({m.provider})" for v in new.values() for m in v.values()]
            log.info("serving %d model version(s): %s", len(loaded), ", ".join(loaded) or "none")
            return errors

    def _version_dirs(self) -> list[Path]:
        root = Path(self.models_dir)
        if not root.is_dir():
            log.error("models directory %s does not exist", root)
            return []
        return [
            v
            for n in root.iterdir()
            if n.is_dir() and not n.name.startswith(".")
            for v in n.iterdir()
            if v.is_dir() and v.name.isdigit()
        ]

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        versions = self.models.get(name)
        if not versions:
            raise ModelNotFound(f"unknown model {name!r}; serving {sorted(self.models) or 'none'}")
        if version is None:
            return versions[self._latest(versions)]
        if version not in versions:
            raise ModelNotFound(
                f"model {name!r} has no version {version}; versions are {sorted(versions)}"
            )
        return versions[version]

    def _latest(self, versions: dict[int, LoadedModel]) -> int:
        """The highest routable version; the highest loaded one when none is routable
        (the backend then refuses it with a message saying why)."""
        if self.routable is not None:
            ready = [v for v, m in versions.items() if self.routable(m.ref)]
            if ready:
                return max(ready)
        return max(versions)

    def all(self) -> list[LoadedModel]:
        return [m for name in sorted(self.models) for _, m in sorted(self.models[name].items())]


def publish_model_info(registry: Registry) -> None:
    """One `gansentry_model_info` series per served version; stale label sets from before
    a reload go. The API and the workers both call this after loading or reloading.
    Each model's non-finite-score counter is created at 0, so alerts and rate() see a
    series before the first one happens (counting resumes where it was after a reload)."""
    metrics.MODEL_INFO.set(
        (m.ref.name, str(m.ref.version), m.manifest.architecture, m.provider)
        for m in registry.all()
    )
    for m in registry.all():
        metrics.NONFINITE_SCORES.labels(m.ref.name)
