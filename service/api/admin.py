"""Operator endpoints (`/admin/*`): admin keys or loopback only (`security.require_admin`),
never the scoring keys."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.api import state
from service.api.models import without_paths
from service.processes import ask_supervisor_to_reload
from service.schemas import ErrorResponse, ReloadResponse
from service.security import require_admin

router = APIRouter(dependencies=[Depends(require_admin)])


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
    summary="Rescan the model repository (also on SIGHUP); admin keys or loopback only",
    openapi_extra={"security": [{"APIKeyHeader": []}]},
)
async def reload(request: Request) -> dict:
    """Loads new and changed versions, then tells the Redis workers to do the same. A
    version that fails to load is reported in `errors`; if an older copy of it was
    serving, that copy keeps serving. Unpinned requests move to a new version once the
    batching backend serves it (through Redis: once a live worker has loaded it). Under
    several serving processes the others reload just after this answer."""
    errors = await state.reload_models(request.app)
    # Under `serve --processes` the other processes reload too (through SIGHUP); this
    # answer is this process's.
    ask_supervisor_to_reload()
    registry = state.registry(request)
    return {
        "loaded": [m.ref.key for m in registry.all()],
        "errors": without_paths(errors, registry),
    }
