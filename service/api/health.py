"""Liveness, readiness and Prometheus metrics: open without an API key, for probes and
scrapers."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import metrics
from service.api import state
from service.schemas import ReadyResponse
from service.security import API_KEY_HEADER, key_matches

log = logging.getLogger(__name__)

router = APIRouter()


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse}},
    summary="Models are loaded and the batching backend takes requests",
)
async def readyz(request: Request) -> JSONResponse:
    """Ready or not, and why, in words. Open to probes, so it names no path, address or
    library message: those go to the log when readiness changes, and into `details` for a
    caller with a valid `X-API-Key` (when keys are configured)."""
    reasons, details = await readiness(request)
    registry = state.registry(request)
    body: dict = {
        "ready": not reasons,
        "reasons": reasons,
        "models": [f"{m.ref.key} ({m.provider})" for m in registry.all()],
    }
    if _has_valid_key(request):
        body["details"] = details
    return JSONResponse(body, status_code=200 if not reasons else 503)


async def readiness(request: Request) -> tuple[list[str], list[str]]:
    """Why the service is not ready, in public words and in detail (both empty when it is
    ready); every readiness endpoint (/readyz, /v2/health/ready) asks this."""
    registry = state.registry(request)
    reasons: list[str] = []
    details: list[str] = []
    if not registry.models:
        failed = len(registry.errors)
        if failed:
            reasons.append(f"no model loaded: {failed} model version(s) failed to load")
        elif not registry.models_dir.is_dir():
            reasons.append("no model loaded: the models directory does not exist")
        else:
            reasons.append("no model loaded: the models directory holds no model version")
        details += [f"{key}: {why}" for key, why in registry.errors.items()]
        details.append(f"models directory: {registry.models_dir.resolve()}")
    ok, why = await state.batcher(request).ready()
    if not ok:
        reasons.append(_public_reason(why))
        details.append(f"batching backend: {why}")
    _log_change(request, reasons, details)
    return reasons, details


def _public_reason(why: str) -> str:
    """A batching backend's reason, less the address and library message it may carry."""
    if "unreachable" in why:
        return "the batching backend cannot reach Redis"
    return why.split(" (", 1)[0]


def _has_valid_key(request: Request) -> bool:
    keys = request.app.state.settings.keys
    given = request.headers.get(API_KEY_HEADER)
    return bool(keys) and given is not None and key_matches(given, keys)


def _log_change(request: Request, reasons: list[str], details: list[str]) -> None:
    """Probes call often: log the full story once per change, not per probe."""
    now = (tuple(reasons), tuple(details))
    if getattr(request.app.state, "readiness", None) == now:
        return
    request.app.state.readiness = now
    if reasons:
        log.warning("not ready: %s (%s)", "; ".join(reasons), "; ".join(details))
    else:
        log.info("ready")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics() -> Response:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
