"""What every batching backend does with a batch once it has one, written once: the
embedded batcher (service/batching/embedded.py) and the Redis worker
(service/batching/redis/worker.py) both run their batches here.

- One ONNX Runtime call per batch; reconstructions and anomaly maps are each fetched
  only if some part of the batch asked for them, and go back only to the parts that did.
- If the call raises, the batch is re-run one part (one request's inputs) at a time, so
  a poison input fails only its own request; a part that fails alone is then run input
  by input to name the first input ONNX Runtime fails on.
- Whole requests are packed greedily up to the batch size (`pack`); a request larger
  than that runs as a batch of its own. (The embedded batcher splits large requests
  across batches instead, in its queue; a Redis entry is answered whole.)"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from service import metrics
from service.batching.base import InferenceFailed

if TYPE_CHECKING:
    from service.registry import LoadedModel

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Part:
    """Consecutive inputs of one request in a batch."""

    x: np.ndarray  # float32 [count, *sample_shape]
    reconstruction: bool
    first: int = 0  # index of x[0] among the request's inputs, for error messages
    anomaly_map: bool = False


@dataclass(frozen=True)
class Outcome:
    """A part's scores (and reconstructions and anomaly maps, if it asked), or why it
    failed."""

    scores: np.ndarray | None = None
    recons: np.ndarray | None = None
    maps: np.ndarray | None = None
    error: InferenceFailed | None = None


def run(model: LoadedModel, parts: Sequence[Part]) -> list[Outcome]:
    """One ONNX Runtime call for all `parts` (blocking: call it off the event loop), one
    outcome per part, in order. Never raises for an ONNX Runtime failure."""
    wanted = any(p.reconstruction for p in parts)
    want_maps = any(p.anomaly_map for p in parts)
    try:
        # Inside the try: parts that do not stack are a failed batch like any other.
        x = parts[0].x if len(parts) == 1 else np.concatenate([p.x for p in parts])
        scores, recons, maps = model.run_observed(x, wanted, want_maps)
    except Exception as e:
        if len(parts) > 1:
            log.warning(
                "batch of %d inputs (%d requests) for %s failed (%s); running them one "
                "request at a time",
                sum(len(p.x) for p in parts),
                len(parts),
                model.ref.key,
                e,
            )
            return [run(model, [p])[0] for p in parts]
        metrics.WORKER_ERRORS.labels(model.ref.name, "inference").inc()
        return [Outcome(error=InferenceFailed(_first_failing(model, parts[0], e)))]
    outcomes = []
    offset = 0
    for p in parts:
        end = offset + len(p.x)
        recon = recons[offset:end] if recons is not None and p.reconstruction else None
        amap = maps[offset:end] if maps is not None and p.anomaly_map else None
        outcomes.append(Outcome(scores[offset:end], recon, amap))
        offset = end
    return outcomes


def _first_failing(model: LoadedModel, part: Part, error: Exception) -> str:
    if len(part.x) > 1:
        for i in range(len(part.x)):
            try:
                model.run(part.x[i : i + 1], reconstruction=False)
            except Exception as e:
                error = e
                break
        else:  # fails only together: name the request
            return f"ONNX Runtime failed on this request's inputs: {error}"
        return f"inputs[{part.first + i}]: ONNX Runtime failed on this input: {error}"
    return f"inputs[{part.first}]: ONNX Runtime failed on this input: {error}"


def pack(items: Sequence[T], size: Callable[[T], int], max_items: int) -> list[list[T]]:
    """Whole requests packed greedily, in order, up to `max_items` inputs per batch; a
    request larger than that runs as a batch of its own."""
    out: list[list[T]] = []
    current: list[T] = []
    total = 0
    for item in items:
        n = size(item)
        if current and total + n > max_items:
            out.append(current)
            current, total = [], 0
        current.append(item)
        total += n
    if current:
        out.append(current)
    return out
