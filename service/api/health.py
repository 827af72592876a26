"""Liveness, readiness and Prometheus metrics: open without an API key, for probes and
scrapers."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api import state
from service.schemas import ReadyResponse

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
    registry = state.registry(request)
    reasons: list[str] = []
    if not registry.models:
        refused = "; ".join(f"{k}: {v}" for k, v in registry.errors.items())
        reasons.append(
            f"no model loaded from {registry.models_dir}" + (f" ({refused})" if refused else "")
        )
    ok, why = await state.batcher(request).ready()
    if not ok:
        reasons.append(why)
    body = {
        "ready": not reasons,
        "reasons": reasons,
        "models": [f"{m.ref.key} ({m.provider})" for m in registry.all()],
    }
    return JSONResponse(body, status_code=200 if not reasons else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
