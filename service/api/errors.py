"""One mapping from exceptions to HTTP answers, used by the exception handlers and by the
scoring route (which needs the status for its metrics before the answer is sent)."""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from service.batching.base import BatchingError, QueueFull
from service.inputs import InputsInvalid, PixelBudgetExceeded
from service.registry import ModelNotFound


def error_response(exc: Exception) -> JSONResponse | None:
    """The answer for a known failure, or None for a bug (left to the 500 handler)."""
    if isinstance(exc, InputsInvalid):
        return JSONResponse({"detail": str(exc), "errors": exc.errors}, status_code=422)
    if isinstance(exc, PixelBudgetExceeded):
        return JSONResponse({"detail": str(exc)}, status_code=413)
    if isinstance(exc, ValidationError):
        errors = [_validation_line(e) for e in exc.errors()]
        return JSONResponse(
            {
                "detail": errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                "errors": errors,
            },
            status_code=422,
        )
    if isinstance(exc, ModelNotFound):
        return JSONResponse({"detail": str(exc.args[0])}, status_code=404)
    if isinstance(exc, BatchingError):
        headers = None
        if isinstance(exc, QueueFull):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code, headers=headers)
    if isinstance(exc, HTTPException):
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )
    return None


def _validation_line(error: dict) -> str:
    """pydantic's ('inputs', 2, 'array') -> 'inputs[2].array', the way clients index."""
    where = ""
    for part in error["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
