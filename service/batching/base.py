"""The one interface every batching backend implements: the embedded in-process batcher
and the Redis queue. The API only ever talks to a `Batcher`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class BatchingError(Exception):
    """Base class; each subclass maps to one HTTP status in the API."""

    status_code = 500


class QueueFull(BatchingError):
    """Backpressure: answered 503 with Retry-After."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(BatchingError):
    """Redis down, no live worker: answered 503 at once rather than hanging."""

    status_code = 503


class DeadlineExceeded(BatchingError):
    """The request's deadline passed before it was computed: answered 504."""

    status_code = 504


class InferenceFailed(BatchingError):
    """ONNX Runtime raised on this request's inputs (a poison input): answered 500."""

    status_code = 500


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray  # float32 [n]
    reconstructions: np.ndarray | None  # float32 [n, *sample_shape]; None if not asked for
    anomaly_maps: np.ndarray | None = None  # float32 [n, H, W]; None if not asked for


class Batcher(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(
        self,
        model: ModelRef,
        x: np.ndarray,
        deadline: float,
        reconstruction: bool = True,
        anomaly_map: bool = False,
    ) -> Scored:
        """Score `x` ([n, *sample_shape], float32, already validated) as part of whatever
        batches the backend forms. `deadline` is a Unix time (time.time()): past it the
        request fails with DeadlineExceeded and is not computed. `reconstruction=False`
        lets a backend skip moving reconstructions it would only throw away (through
        Redis they are most of the bytes); it may still return them. `anomaly_map=True`
        asks for the graph's anomaly maps too (only for a model that has them)."""
        ...

    async def ready(self) -> tuple[bool, str]:
        """(ready, reason): the backend can take requests now."""
        ...

    def serves(self, model: ModelRef) -> bool:
        """Whether the backend can compute this model version now; the registry routes
        "latest" only to versions it serves. Called per request: no I/O."""
        ...

    async def models_reloaded(self) -> None:
        """The API reloaded its model repository: pass it on to whatever computes (the
        Redis workers). Never raises for an unreachable backend: workers rescan by
        themselves too."""
        ...
