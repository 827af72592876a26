"""ONNX Runtime session creation with the execution provider that actually loaded.

onnxruntime-gpu falls back to the CPU silently when CUDA or cuDNN is missing, and
`get_available_providers()` still lists them; only `session.get_providers()` tells the
truth, so that is what every check here reads."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from service.settings import Settings

log = logging.getLogger(__name__)

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
SHORT = {TRT: "tensorrt", CUDA: "cuda", CPU: "cpu"}
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


def create_session(
    model_path: Path, settings: Settings, sample_shape: Sequence[int]
) -> tuple[ort.InferenceSession, str]:
    """Returns the session and the short name of the provider that really runs it."""
    available = set(ort.get_available_providers())
    requested = settings.providers
    chain = [p for p in WANTED[requested] if p in available or p == CPU]
    if requested in ("tensorrt", "cuda") and WANTED[requested][0] not in available:
        raise ProviderError(
            f"GANSENTRY_PROVIDERS={requested} but this onnxruntime build has no "
            f"{WANTED[requested][0]} (available: {sorted(available)})"
        )
    providers = [(p, provider_options(p, settings, sample_shape)) for p in chain]
    session = ort.InferenceSession(
        str(model_path), sess_options=session_options(settings), providers=providers
    )
    loaded = session.get_providers()
    if requested in ("tensorrt", "cuda") and WANTED[requested][0] not in loaded:
        raise ProviderError(
            f"GANSENTRY_PROVIDERS={requested} but {WANTED[requested][0]} failed to load "
            f"(check the NVIDIA driver, CUDA and cuDNN libraries); session runs on {loaded}"
        )
    provider = SHORT.get(loaded[0], loaded[0])
    if requested == "auto" and provider == "cpu" and (TRT in available or CUDA in available):
        log.warning(
            "GPU providers are installed but did not load for %s; serving on the CPU", model_path
        )
    return session, provider
