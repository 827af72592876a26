"""Batching backends behind one interface (`base.Batcher`), chosen by one setting,
`GANSENTRY_BATCHING`: `embedded` (in-process, `embedded.py`) or `redis` (API replicas
queue requests in Redis for `gansentry worker` processes, `redis/`). Left unset it is
`redis` when `GANSENTRY_REDIS_URL` is set, else `embedded`, as before the setting existed.

A new backend is one module or package implementing `Batcher` plus its entry in
`BACKENDS`; the setting's validation, the CLI's choices and the shared behavioural tests
(tests/test_batching_backends.py) all read this table. Entries are import paths, so a
backend's dependencies (redis-py for `redis`) load only when it is chosen."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from service.batching.base import Batcher

if TYPE_CHECKING:
    from service.registry import Registry
    from service.settings import Settings

# name -> "module:class" of a class built as cls(settings, registry).
BACKENDS: dict[str, str] = {
    "embedded": "service.batching.embedded:EmbeddedBatcher",
    "redis": "service.batching.redis.client:RedisBatcher",
}


def create_batcher(settings: Settings, registry: Registry) -> Batcher:
    module, _, name = BACKENDS[settings.batching_backend].partition(":")
    cls = getattr(import_module(module), name)
    batcher: Batcher = cls(settings, registry)
    return batcher
