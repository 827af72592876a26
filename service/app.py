"""The FastAPI application: `create_app(settings)` wires the model registry, the batching
backend, API keys, the body limit and the routes.

The registry and the batcher live in this process; `gansentry serve --processes N` runs N
such apps on one port (`service/processes.py`), and scaling out is replicas."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gansentry import __version__
from service.api import admin, health, models, score, state, v2
from service.api.errors import error_response
from service.api.fast import ScoringRoutes
from service.batching import create_batcher
from service.batching.base import BatchingError
from service.gc_tuning import settle_after_startup
from service.inputs import InputsInvalid
from service.providers import ProviderError
from service.registry import ModelNotFound, Registry, publish_model_info
from service.schemas import ScoreRequest
from service.security import BodyLimitMiddleware
from service.settings import Settings

log = logging.getLogger("gansentry.service")

DESCRIPTION = """Anomaly scores from GAN models exported to ONNX.

`POST /score` takes base64 images, arrays in the model's input shape, or raw tabular
records (JSON), or `image` file uploads (multipart). `GET /models` lists what is served.
Send `X-API-Key` when the server is configured with keys; `/healthz`, `/readyz` and
`/metrics` are open. `/admin/*` takes only admin keys (`GANSENTRY_ADMIN_KEYS`), and answers
only to loopback clients when none are set.

Errors: every input is checked before any is queued, and one bad input fails its whole
request with 422 and a message naming it (`inputs[2]: expected array of shape [1, 32, 32],
got [28, 28]`); other requests, even those it would have shared a batch with, are not
affected. Unknown model or version: 404. Body over `max_body_bytes` or more inputs than
`max_inputs_per_request`: 413. Queue full: 503 with `Retry-After`. Deadline
(`timeout_ms`, `X-Request-Timeout-Ms`, capped by `request_timeout_ms`) passed: 504."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    try:
        registry = await asyncio.to_thread(Registry(settings.models_dir, settings).load)
    except ProviderError as e:
        log.critical("cannot start: %s", e)
        app.state.start_error = f"cannot start: {e}"
        raise
    publish_model_info(registry)
    batcher = create_batcher(settings, registry)
    registry.routable = batcher.serves
    await batcher.start()
    settle_after_startup()
    app.state.registry = registry
    app.state.batcher = batcher
    app.state.reload_lock = asyncio.Lock()
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[Any]] = set()

    def on_sighup() -> None:
        log.info("SIGHUP: reloading models from %s", settings.models_dir)
        task = loop.create_task(state.reload_models(app))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        sighup = True
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):
        sighup = False  # not the main thread (test clients), or no SIGHUP on this OS
    try:
        yield
    finally:
        if sighup:
            loop.remove_signal_handler(signal.SIGHUP)
        await batcher.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="gansentry",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # Prometheus is the metrics path; FastAPI's OpenTelemetry hooks cost per request.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.settings = settings
    # Added first, so it runs inside the body limit (the last middleware added is outermost).
    app.add_middleware(ScoringRoutes, routers=[score.router, v2.router])
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(QuietStartFailure, state=app.state)
    app.include_router(score.router, tags=["scoring"])
    app.include_router(models.router, tags=["models"])
    app.include_router(health.router, tags=["operations"])
    app.include_router(admin.router, tags=["operations"])
    app.include_router(v2.router, tags=["kserve v2"])
    for exc in (InputsInvalid, ModelNotFound, BatchingError):
        app.add_exception_handler(exc, _handle)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


class QuietStartFailure:
    """A start-up refused for a reason already logged in one line (`start_error`: an
    explicit GPU provider that does not load) reaches uvicorn without the traceback that
    Starlette puts in the failure message, which uvicorn would log: the operator reads
    the reason, not a stack. `gansentry serve` then exits with that reason as its error."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def quiet(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and start_error(self.state):
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, quiet)


def start_error(state: State) -> str | None:
    return getattr(state, "start_error", None)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    answer = error_response(exc)
    if answer is None:
        raise exc
    return answer


def _openapi(app: FastAPI) -> dict[str, Any]:
    """/score parses its body itself (for speed), so its schema is added here by hand."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        request = ScoreRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request.pop("$defs", {}))
        components["ScoreRequest"] = request
        components.update(v2.openapi_components())
        schema["components"]["securitySchemes"] = {
            "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        }
        app.openapi_schema = schema
    return app.openapi_schema
