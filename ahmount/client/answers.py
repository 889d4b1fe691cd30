"""The one decoding of a hub's error answer into the domain exception tree, for both ways a
response travels (httpx's, and :mod:`direct_reads`).
"""

from __future__ import annotations

import json

import httpx

from ahmount import errors

#: Answers that mean "not now": the request is sent again after a backoff.
RETRYABLE_STATUS = {502, 503, 504}


def raise_for_response(response: httpx.Response, body: bytes | None = None) -> None:
    """The one mapping from an HTTP error response to a domain exception."""
    if response.status_code < 400:
        return
    raw = body if body is not None else response.content
    code, message, path = "internal", "", None
    try:
        error = json.loads(raw)["error"]
        code, message, path = error["code"], error["message"], error.get("path")
    except (ValueError, KeyError, TypeError):
        message = f"hub answered {response.status_code} to {response.request.method} " \
                  f"{response.request.url.path}"
        if response.status_code in RETRYABLE_STATUS:
            code = "unavailable"
    cls = errors.ERRORS_BY_CODE.get(code, errors.InternalError)
    raise cls(message, path=path)
