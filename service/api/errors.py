"""One mapping from exceptions to HTTP answers, used by the exception handlers and by the
scoring routes (which need the status for their metrics before the answer is sent). Each
protocol writes the same `Failure` in its own error body."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from service.batching.base import BatchingError, QueueFull
from service.inputs import InputsInvalid, PixelBudgetExceeded
from service.registry import ModelNotFound

INTERNAL_ERROR = "internal error while scoring; the server log has the details"


@dataclass(frozen=True)
class Failure:
    status: int
    message: str
    errors: list[str] | None = None  # one line per bad input, where there are several
    headers: dict[str, str] | None = None


def classify(exc: Exception) -> Failure | None:
    """The status and message for a known failure, or None for a bug."""
    if isinstance(exc, InputsInvalid):
        return Failure(422, str(exc), exc.errors)
    if isinstance(exc, PixelBudgetExceeded):
        return Failure(413, str(exc))
    if isinstance(exc, ValidationError):
        errors = [_validation_line(e) for e in exc.errors()]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return Failure(422, errors[0] + more, errors)
    if isinstance(exc, ModelNotFound):
        return Failure(404, str(exc.args[0]))
    if isinstance(exc, BatchingError):
        headers = None
        if isinstance(exc, QueueFull):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        return Failure(exc.status_code, str(exc), headers=headers)
    if isinstance(exc, HTTPException):
        return Failure(exc.status_code, str(exc.detail), headers=exc.headers)
    return None


def error_response(exc: Exception) -> JSONResponse | None:
    """The answer for a known failure, or None for a bug (left to the 500 handler)."""
    failure = classify(exc)
    if failure is None:
        return None
    body: dict = {"detail": failure.message}
    if failure.errors is not None:
        body["errors"] = failure.errors
    return JSONResponse(body, status_code=failure.status, headers=failure.headers)


def _validation_line(error: dict) -> str:
    """pydantic's ('inputs', 2, 'array') -> 'inputs[2].array', the way clients index."""
    where = ""
    for part in error["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
