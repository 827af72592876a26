"""ONNX Runtime session creation with the execution provider that actually loaded.

onnxruntime-gpu falls back to the CPU silently when CUDA or cuDNN is missing, and
`get_available_providers()` still lists them; only `session.get_providers()` tells the
truth, so that is what every check here reads."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from service.settings import Settings

log = logging.getLogger(__name__)

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
SHORT = {TRT: "tensorrt", CUDA: "cuda", CPU: "cpu"}
NAMES = {TRT: "TensorRT", CUDA: "CUDA", CPU: "CPU"}
WANTED = {"tensorrt": [TRT, CUDA, CPU], "cuda": [CUDA, CPU], "cpu": [CPU], "auto": [TRT, CUDA, CPU]}


class ProviderError(RuntimeError):
    """An explicitly requested GPU provider did not load: start-up must stop."""


def session_options(settings: Settings) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # ORT sizes its pool from the host's cores, not the container's quota; pin it.
    opts.intra_op_num_threads = settings.ort_threads()
    opts.inter_op_num_threads = settings.inter_op_threads
    # Idle pool threads spin by default, taking the cores the event loop needs between
    # batches: on 2 cores, spinning off raised served throughput ~30%.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def provider_options(
    name: str, settings: Settings, sample_shape: Sequence[int]
) -> dict[str, str | int]:
    if name == CUDA:
        opts: dict[str, str | int] = {
            # No exhaustive cuDNN search per new batch size (hundreds of ms each).
            "cudnn_conv_algo_search": "HEURISTIC",
            "arena_extend_strategy": "kSameAsRequested",
            "do_copy_in_default_stream": 1,
        }
        if settings.cuda_mem_limit_mb:
            opts["gpu_mem_limit"] = settings.cuda_mem_limit_mb * 1024 * 1024
        return opts
    if name == TRT:
        dims = "x".join(str(d) for d in sample_shape)
        cache = str(Path(settings.trt_cache_dir).resolve())
        return {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": cache,
            # One engine covers every batch size up to the batcher's maximum.
            "trt_profile_min_shapes": f"x:1x{dims}",
            "trt_profile_opt_shapes": f"x:{settings.max_batch_size}x{dims}",
            "trt_profile_max_shapes": f"x:{max(settings.max_batch_size, 64)}x{dims}",
        }
    return {}


@dataclass(frozen=True)
class Probe:
    """What the first session of this process learned about the requested providers."""

    chain: tuple[str, ...]  # the providers every later session is given, best first
    line: str  # the one log line that says which provider serves and why


_probes: dict[str, Probe] = {}
_probe_lock = threading.Lock()


def create_session(
    model_path: Path, settings: Settings, sample_shape: Sequence[int]
) -> tuple[ort.InferenceSession, str]:
    """Returns the session and the short name of the provider that really runs it.

    The first session of a process probes the providers: it is created with the whole
    requested chain while ONNX Runtime's own output is captured (without CUDA libraries
    it prints two error blocks per session, which read as a crash), and one log line says
    what serves. Later sessions get only the providers that loaded then, so they print
    nothing, and a missing library is not looked for again per model."""
    requested = settings.providers
    available = set(ort.get_available_providers())
    if requested in ("tensorrt", "cuda") and WANTED[requested][0] not in available:
        raise ProviderError(
            f"GANSENTRY_PROVIDERS={requested} but this onnxruntime build has no "
            f"{WANTED[requested][0]} (available: {sorted(available)})"
        )
    with _probe_lock:
        probe = _probes.get(requested)
        if probe is None:
            chain = [p for p in WANTED[requested] if p in available or p == CPU]
            with _captured_output() as captured:
                session = _session(model_path, settings, sample_shape, chain)
            probe = _probe(requested, chain, available, session.get_providers(), captured)
            if captured:
                log.debug("ONNX Runtime output while probing providers:\n%s", "\n".join(captured))
            _check_loaded(requested, session.get_providers())
            _probes[requested] = probe
            log.log(logging.WARNING if "unavailable" in probe.line else logging.INFO, probe.line)
            return session, SHORT.get(session.get_providers()[0], session.get_providers()[0])
    session = _session(model_path, settings, sample_shape, list(probe.chain))
    loaded = session.get_providers()
    _check_loaded(requested, loaded)
    if loaded[0] != probe.chain[0]:
        # The provider loaded for the probe but not for this graph (an operator TensorRT
        # does not support, say): a fact about this model, so said per model.
        log.warning("%s runs on %s, not %s", model_path, loaded[0], probe.chain[0])
    return session, SHORT.get(loaded[0], loaded[0])


def _session(
    model_path: Path, settings: Settings, sample_shape: Sequence[int], chain: list[str]
) -> ort.InferenceSession:
    providers = [(p, provider_options(p, settings, sample_shape)) for p in chain]
    return ort.InferenceSession(
        str(model_path), sess_options=session_options(settings), providers=providers
    )


def _check_loaded(requested: str, loaded: list[str]) -> None:
    if requested in ("tensorrt", "cuda") and WANTED[requested][0] not in loaded:
        raise ProviderError(
            f"GANSENTRY_PROVIDERS={requested} but {WANTED[requested][0]} failed to load "
            f"(check the NVIDIA driver, CUDA and cuDNN libraries); session runs on {loaded}"
        )


def _probe(
    requested: str, chain: list[str], available: set[str], loaded: list[str], captured: list[str]
) -> Probe:
    serving = NAMES.get(loaded[0], loaded[0])
    gpu = [p for p in (TRT, CUDA) if p in WANTED[requested]]
    missing = [p for p in gpu if p not in loaded]
    kept = tuple(p for p in chain if p in loaded) or (CPU,)
    if requested == "cpu":
        return Probe(kept, f"serving on CPU (GANSENTRY_PROVIDERS={requested})")
    if not missing:
        return Probe(kept, f"serving on {serving} (GANSENTRY_PROVIDERS={requested})")
    if not any(p in available for p in missing):
        why = "this onnxruntime build has none; install onnxruntime-gpu"
    else:
        why = _reason(captured) or "ONNX Runtime did not say why"
    names = ", ".join(NAMES[p] for p in missing)
    if serving == "CPU":
        return Probe(kept, f"GPU providers unavailable ({why}); serving on CPU")
    return Probe(kept, f"{names} unavailable ({why}); serving on {serving}")


def _reason(captured: list[str]) -> str | None:
    """The first missing library or failure ONNX Runtime named, without its paths."""
    for line in captured:
        match = re.search(r"with error: (.+?)(?:\x1b\[m)?$", line)
        if match:
            return match.group(1).strip()
    for line in captured:
        match = re.search(r"Failed to create \w+\. (.+?\.)", line)
        if match:
            return match.group(1)
    return None


@contextlib.contextmanager
def _captured_output() -> Iterator[list[str]]:
    """Collects what ONNX Runtime writes to stdout and stderr (its C++ logger writes to
    the file descriptors, its Python fallback prints) into the yielded list of lines.
    Only the probe runs under it, once per process, before serving starts."""
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    printed = io.StringIO()  # where sys.stdout is not file descriptor 1 (a test runner's)
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            text += printed.getvalue()
            lines.extend(line for line in text.splitlines() if line.strip())
