"""The one place that turns domain errors into HTTP responses."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ahmount import errors

log = logging.getLogger("ahmount.server")

_STATUS: dict[type[errors.AhError], int] = {
    errors.ChecksumMismatch: 422,
    errors.RangeNotSatisfiable: 416,
    errors.TooLarge: 413,
    errors.InvalidArgument: 400,
    errors.NotFound: 404,
    errors.AlreadyExists: 409,
    errors.UnknownChanges: 409,
    errors.Changed: 412,
    errors.Conflict: 409,
    errors.PermissionDenied: 403,
    errors.Unauthenticated: 401,
    errors.HubUnavailable: 503,
    errors.StorageFull: 507,
    errors.InternalError: 500,
}


def status_for(exc: errors.AhError) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


def error_body(code: str, message: str, path: str | None) -> dict[str, object]:
    return {"error": {"code": code, "message": message, "path": path}}


async def handle_domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.AhError)
    status = status_for(exc)
    if status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc)
    return JSONResponse(error_body(exc.code, exc.message, exc.path), status_code=status)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("%s %s crashed", request.method, request.url.path, exc_info=exc)
    body = error_body("internal", f"internal error while serving {request.url.path}", None)
    return JSONResponse(body, status_code=500)


async def handle_routing_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and wrong methods, in the same JSON shape as every other error."""
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else "invalid_argument"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(code, message, request.url.path), status_code=exc.status_code,
                        headers=exc.headers)
