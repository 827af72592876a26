"""Optional API keys (`X-API-Key`), admin access, and the request-body limit.

Keys are compared with `hmac.compare_digest` against every configured key, so the time a
check takes does not reveal how much of a guess matched or which key it was close to."""

from __future__ import annotations

import hmac
import ipaddress
import json

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_KEY_HEADER = "X-API-Key"


def key_matches(given: str, keys: frozenset[str]) -> bool:
    candidate = given.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(candidate, key.encode())
    return ok


async def require_api_key(request: Request) -> None:
    """FastAPI dependency for every route except /healthz, /readyz, /metrics and the docs.
    Async on purpose: FastAPI runs a sync dependency in a thread, a hop per request."""
    keys: frozenset[str] = request.app.state.settings.keys
    if not keys:
        return
    given = request.headers.get(API_KEY_HEADER)
    if given is None:
        raise HTTPException(401, f"missing {API_KEY_HEADER} header", {"WWW-Authenticate": "ApiKey"})
    if not key_matches(given, keys):
        raise HTTPException(401, f"invalid {API_KEY_HEADER}", {"WWW-Authenticate": "ApiKey"})


async def require_admin(request: Request) -> None:
    """FastAPI dependency for /admin/*. Reloading is an operator's act, not a client's, so
    the scoring keys never open it. With admin keys set, `X-API-Key` must hold one of
    them; without, only loopback clients get in, which on a host (`gansentry serve` on
    0.0.0.0) means the operator's shell. uvicorn puts the address from X-Forwarded-For in
    place of a trusted proxy's (FORWARDED_ALLOW_IPS, default 127.0.0.1), so a reverse proxy
    on the same host that sends it does not make every client look local."""
    settings = request.app.state.settings
    keys: frozenset[str] = settings.admin_key_set
    if keys:
        given = request.headers.get(API_KEY_HEADER)
        if given is None:
            raise HTTPException(
                401,
                f"admin endpoints need an admin key in {API_KEY_HEADER} (GANSENTRY_ADMIN_KEYS)",
                {"WWW-Authenticate": "ApiKey"},
            )
        if not key_matches(given, keys):
            raise HTTPException(
                401,
                f"{API_KEY_HEADER} is not an admin key; scoring keys do not open admin "
                "endpoints (GANSENTRY_ADMIN_KEYS)",
                {"WWW-Authenticate": "ApiKey"},
            )
        return
    host = request.client.host if request.client else None
    if not is_loopback(host):
        raise HTTPException(
            403,
            "admin endpoints answer only to loopback clients while GANSENTRY_ADMIN_KEYS is "
            f"not set (this request came from {host or 'an unknown address'}); set admin "
            f"keys and send one in {API_KEY_HEADER}, or use SIGHUP to reload",
        )


def is_loopback(host: str | None) -> bool:
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: at once from Content-Length, and while reading for
    chunked or lying clients, so an oversized body is never buffered whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._reject(send, declared, scope.get("path", ""))
                    return
                break
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message(received))
            return message

        await self.app(scope, limited, send)

    def _message(self, size: int) -> str:
        return f"request body of {size}+ bytes is over the limit of {self.max_bytes} bytes"

    async def _reject(self, send: Send, size: int, path: str) -> None:
        # The KServe v2 protocol's error body is {"error": ...}; every other route's, FastAPI's.
        key = "error" if path == "/v2" or path.startswith("/v2/") else "detail"
        body = json.dumps({key: self._message(size)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
