"""The scoring routes (`POST /score` and the KServe v2 `infer` routes) dispatched without
the framework's per-request machinery.

Profiled under load on two cores, FastAPI and Starlette spent about as much of the event
loop on a single-input request as the request's own work: matching the path against
every route in turn, resolving parameters for handlers that take only the request and
path strings, two exit stacks and an exception wrapper per call. The scoring handlers
need none of it: they parse their bodies themselves and answer their own errors. So this
middleware, inside the body limit, matches the few scoring routes with the routes' own
compiled paths and calls their handlers directly; every other request (another path or
method, or an app mounted under a root path) goes on through the router as before. The
routes stay registered with FastAPI, which documents them and is their one definition."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from re import Pattern
from typing import Any

from fastapi.routing import APIRoute, APIRouter
from starlette.convertors import Convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import score, v2
from service.api.errors import error_response

# Handlers of the form `handler(request, **path_params) -> Response` that catch their
# own errors.
ENDPOINTS: tuple[Callable[..., Awaitable[Response]], ...] = (
    score.score,
    v2.infer,
    v2.infer_version,
)


class ScoringRoutes:
    """`routers`: the routers that hold the scoring routes, as included in the app
    (without a prefix of their own)."""

    def __init__(self, app: ASGIApp, routers: Sequence[APIRouter]) -> None:
        self.app = app
        self.routes: list[tuple[Pattern[str], dict[str, Convertor[Any]], Callable]] = [
            (r.path_regex, r.param_convertors, r.endpoint)
            for router in routers
            for r in router.routes
            if isinstance(r, APIRoute) and r.endpoint in ENDPOINTS and "POST" in r.methods
        ]
        assert len(self.routes) == len(ENDPOINTS), "every scoring handler has its route"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path: str = scope["path"]
            for regex, convertors, endpoint in self.routes:
                match = regex.match(path)
                if match is not None:
                    params = {k: convertors[k].convert(v) for k, v in match.groupdict().items()}
                    await self._handle(endpoint, params, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    @staticmethod
    async def _handle(
        endpoint: Callable[..., Awaitable[Response]],
        params: dict[str, Any],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        try:
            response = await endpoint(request=Request(scope, receive, send), **params)
        except Exception as e:
            # What the exception handlers behind the router would make of an error that
            # escaped a handler.
            answer = error_response(e)
            if answer is None:
                raise
            response = answer
        await response(scope, receive, send)
