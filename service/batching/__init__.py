"""Batching backends behind one interface (`base.Batcher`): the embedded in-process
batcher by default, the Redis queue when `GANSENTRY_REDIS_URL` is set."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.batching.base import Batcher

if TYPE_CHECKING:
    from service.registry import Registry
    from service.settings import Settings


def create_batcher(settings: Settings, registry: Registry) -> Batcher:
    if settings.redis_url:
        from service.batching.redis_backend import RedisBatcher

        return RedisBatcher(settings, registry)
    from service.batching.embedded import EmbeddedBatcher

    return EmbeddedBatcher(settings, registry)
