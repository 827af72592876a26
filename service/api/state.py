"""What the lifespan puts on `app.state`, and the one reload path shared by
`POST /admin/reload` and SIGHUP."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request

from service.batching.base import Batcher
from service.providers import ProviderError
from service.registry import Registry, publish_model_info

log = logging.getLogger(__name__)


def registry(request: Request) -> Registry:
    return request.app.state.registry


def batcher(request: Request) -> Batcher:
    return request.app.state.batcher


async def reload_models(app: FastAPI) -> dict[str, str]:
    """Rescan the repository off the event loop; requests keep being served meanwhile.
    Then tell the batching backend, which passes the reload on to its workers (Redis)."""
    reg: Registry = app.state.registry
    async with app.state.reload_lock:
        try:
            errors = await asyncio.to_thread(reg.reload)
        except ProviderError as e:
            log.error("reload refused, the loaded models keep serving: %s", e)
            return {"*": str(e)}
        publish_model_info(reg)
        batching: Batcher = app.state.batcher
        await batching.models_reloaded()
    return errors
