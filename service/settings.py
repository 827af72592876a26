"""Service configuration: every field reads a `GANSENTRY_*` environment variable (or a
`.env` file), and CLI flags override them."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Providers = Literal["auto", "tensorrt", "cuda", "cpu"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GANSENTRY_", env_file=".env", extra="ignore")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    models_dir: Path = Path("models")
    log_level: str = "info"
    # Serving processes sharing the port (service/processes.py): on a CPU, small models
    # need more than one event loop to keep ONNX Runtime busy.
    processes: int = Field(1, ge=1, le=64, description="serving processes on the port")

    providers: Providers = "auto"
    intra_op_threads: int = Field(
        0, ge=0, description="0 = the CPUs this process may use (its share under serve --processes)"
    )
    inter_op_threads: int = Field(1, ge=1)
    trt_cache_dir: Path = Path(".trt_cache")
    cuda_mem_limit_mb: int = Field(0, ge=0, description="0 = no limit")

    max_batch_size: int = Field(32, ge=1, le=4096, description="items, not requests")
    max_batch_delay_ms: float = Field(2.0, ge=0, le=10_000)
    max_queue_items: int = Field(2048, ge=1, description="queued items per model before 503")
    request_timeout_ms: float = Field(10_000, gt=0, description="per-request deadline -> 504")

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_inputs_per_request: int = Field(256, ge=1)
    # Decoding is the costly part of a request and a small body can hold many pixels (a
    # 4000x4000 1-bit PNG is 2 kB), so pixels are bounded per image and per request, from
    # the headers, before any is decoded. Pillow refuses images past ~179M pixels anyway.
    max_image_pixels: int = Field(16_000_000, ge=64, le=89_000_000, description="per image")
    max_request_pixels: int = Field(
        64_000_000, ge=64, description="decoded pixels per request, all its images together"
    )

    api_keys: str = Field("", description="comma-separated; empty = no auth")
    api_keys_file: Path | None = Field(None, description="one key per line")
    # /admin/* takes only these keys (never the scoring keys); none set: loopback only.
    admin_keys: str = Field("", description="comma-separated; empty = loopback clients only")
    admin_keys_file: Path | None = Field(None, description="one key per line")

    # One of service.batching.BACKENDS; None: redis when redis_url is set, else embedded.
    batching: str | None = Field(None, description="embedded | redis")
    redis_url: str | None = None
    redis_stream_maxlen: int = Field(10_000, ge=1, description="queued entries per model")
    redis_claim_idle_ms: int = Field(5_000, ge=100, description="reclaim entries idle this long")
    redis_result_ttl_s: int = Field(60, ge=1)
    redis_max_deliveries: int = Field(3, ge=1, description="poison input after this many tries")
    worker_heartbeat_s: float = Field(2.0, gt=0)
    worker_metrics_port: int = Field(9100, ge=0, le=65535)
    worker_name: str | None = None

    @field_validator("batching")
    @classmethod
    def _known_backend(cls, value: str | None) -> str | None:
        from service.batching import BACKENDS

        if value is not None and value not in BACKENDS:
            raise ValueError(f"unknown batching backend {value!r}; one of {', '.join(BACKENDS)}")
        return value

    @model_validator(mode="after")
    def _redis_needs_url(self) -> Settings:
        if self.batching == "redis" and not self.redis_url:
            raise ValueError("GANSENTRY_BATCHING=redis needs GANSENTRY_REDIS_URL (or --redis-url)")
        return self

    @property
    def batching_backend(self) -> str:
        """The backend that serves: the explicit setting, else the one the URL implies."""
        return self.batching or ("redis" if self.redis_url else "embedded")

    @cached_property
    def keys(self) -> frozenset[str]:
        """The scoring keys (`X-API-Key` on every route but /admin/* and the probes)."""
        return _read_keys(self.api_keys, self.api_keys_file)

    @cached_property
    def admin_key_set(self) -> frozenset[str]:
        return _read_keys(self.admin_keys, self.admin_keys_file)

    def ort_threads(self) -> int:
        """Each serving process gets its share of the CPUs unless told otherwise."""
        return self.intra_op_threads or max(1, available_cpus() // self.processes)


def available_cpus() -> int:
    """The CPUs this process may use (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _read_keys(inline: str, file: Path | None) -> frozenset[str]:
    keys = {k.strip() for k in inline.split(",") if k.strip()}
    if file is not None:
        keys |= {line.strip() for line in file.read_text().splitlines() if line.strip()}
    return frozenset(keys)
