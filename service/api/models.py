"""The model repository over HTTP: what is served and by which provider (reloading it is
in service/api/admin.py, behind admin access)."""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends, Request

from service.api import state
from service.registry import LoadedModel, ModelNotFound, Registry
from service.schemas import ErrorResponse, ModelInfo, ModelList
from service.security import require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])


def without_paths(errors: dict[str, str], registry: Registry) -> dict[str, str]:
    """Load errors name files relative to the repository (ONNX Runtime's messages carry
    absolute paths, which tell a client about the host); the log has them whole."""
    roots = sorted({str(registry.models_dir.resolve()), str(registry.models_dir)}, key=len)
    cleaned = {}
    for key, message in errors.items():
        for root in reversed(roots):
            message = message.replace(root + os.sep, "").replace(root, "the models directory")
        cleaned[key] = message
    return cleaned


def version_info(model: LoadedModel) -> dict:
    m = model.manifest
    return {
        "version": model.ref.version,
        "architecture": m.architecture,
        "provider": model.provider,
        "input": m.input.model_dump(mode="json"),
        "threshold": m.threshold.model_dump(mode="json"),
        "metrics": m.metrics,
        "provenance": m.provenance.model_dump(mode="json"),
        "sha256": model.sha256,
        "created_at": m.created_at.isoformat(),
        "outputs": m.outputs,
        "anomaly_map": None if m.anomaly_map is None else m.anomaly_map.model_dump(mode="json"),
    }


def model_info(name: str, versions: dict[int, LoadedModel], registry: Registry) -> dict:
    """`latest` is the version an unpinned request gets now (through Redis: the highest one a
    live worker serves), not simply the highest loaded one."""
    return {
        "name": name,
        "latest": registry.get(name).ref.version,
        "versions": [version_info(versions[v]) for v in sorted(versions)],
    }


@router.get("/models", response_model=ModelList, summary="Every served model and version")
async def list_models(request: Request) -> dict:
    registry = state.registry(request)
    return {
        "models": [model_info(n, registry.models[n], registry) for n in sorted(registry.models)],
        "refused": without_paths(registry.errors, registry),
    }


@router.get(
    "/models/{name}",
    response_model=ModelInfo,
    responses={404: {"model": ErrorResponse}},
    summary="One model: versions, architecture, input spec, threshold, metrics, provider",
)
async def get_model(name: str, request: Request) -> dict:
    registry = state.registry(request)
    registry.get(name)  # 404 with the served names when unknown
    versions = registry.models.get(name)
    if not versions:
        raise ModelNotFound(f"unknown model {name!r}")
    return model_info(name, versions, registry)
