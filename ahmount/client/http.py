"""The HTTP session of a hub client: one httpx client, retries with backoff, failing fast
for a moment after a hub was found down, and the one decoding of an error response into the
domain exception tree (:func:`raise_for_response`). Endpoints live in :mod:`hub_client`,
transfers to and from disk in :mod:`files` and :mod:`uploads`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import anyio
import httpx
import pydantic_core

from ahmount import errors
from ahmount.client.transport import LargeReadTransport

log = logging.getLogger("ahmount.client")

#: Bytes per read and write of a transfer.
CHUNK = 1 << 20
RETRYABLE_STATUS = {502, 503, 504}
Progress = Callable[[int], None]


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



class HttpSession:
    """Requests to one hub. ``base_url`` is ``http://host:port`` or ``unix:/path/to/socket``;
    ``transport`` overrides how requests travel (the embedded hub's in-process one).
    Requests that fail on the way (connection refused, reset, timeouts, 502/503/504) are
    retried ``retries`` times with exponential backoff; then :class:`HubUnavailable`, and for
    ``down_for`` seconds every request fails at once (a mount would otherwise stall each
    syscall on a dead hub)."""

    def __init__(self, base_url: str, *, api_key: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, timeout: float = 60.0,
                 retries: int = 5, backoff: float = 0.2, down_for: float = 0.0) -> None:
        headers = {"user-agent": "ahmount"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        if base_url.startswith("unix:"):
            transport = transport or LargeReadTransport(uds=base_url[len("unix:"):])
            base_url = "http://hub"
        self.base_url = base_url
        self.retries = retries
        self.backoff = backoff
        self.down_for = down_for
        self._down_until = 0.0
        #: When the hub last answered (wall clock), and whether it was reachable then.
        self.last_answer: float | None = None
        self.reachable = True
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=headers, transport=transport or LargeReadTransport(),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        )

    def go_offline(self) -> None:
        """Never contact the hub again (``ah-mount --offline``): every request fails at
        once as unavailable."""
        self._down_until = float("inf")
        self.reachable = False

    async def __aenter__(self) -> HttpSession:
        await self._http.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._http.__aexit__(exc_type, exc, tb)

    async def send(self, method: str, url: str, *, stream: bool = False,
                    **kwargs: Any) -> httpx.Response:
        """Send with retries; returns a successful response (streamed if ``stream``)."""
        idempotent = method in ("GET", "HEAD", "PUT", "DELETE")
        if self._down_until > time.monotonic():
            raise errors.HubUnavailable(
                f"hub at {self.base_url} is unreachable (failing fast for a moment): "
                f"{method} {url}", path=url)
        attempt = 0
        while True:
            try:
                follow = kwargs.pop("follow_redirects", False)
                request = self._http.build_request(method, url, **kwargs)
                response = await self._http.send(request, stream=stream,
                                                 follow_redirects=follow)
                kwargs["follow_redirects"] = follow
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failure: Exception = exc
            except (httpx.ReadError, httpx.ReadTimeout, httpx.WriteError,
                    httpx.RemoteProtocolError) as exc:
                if not idempotent:
                    raise errors.HubUnavailable(
                        f"{method} {url} failed on the way and is not safe to repeat: {exc}",
                        path=url,
                    ) from exc
                failure = exc
            else:
                if response.status_code in RETRYABLE_STATUS and attempt < self.retries:
                    await response.aclose()
                    failure = errors.HubUnavailable(f"hub answered {response.status_code}")
                else:
                    self.last_answer = time.time()
                    self.reachable = True
                    if response.status_code >= 400:
                        body = await response.aread()
                        await response.aclose()
                        raise_for_response(response, body)
                    return response
            attempt += 1
            if attempt > self.retries or ("content" in kwargs and not isinstance(
                kwargs["content"], bytes | str
            )):
                self._down_until = time.monotonic() + self.down_for
                self.reachable = False
                raise errors.HubUnavailable(
                    f"hub at {self.base_url} is unreachable ({method} {url}): {failure}",
                    path=url,
                ) from failure
            delay = self.backoff * (2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("%s %s failed (%s); retry %d in %.1fs", method, url, failure,
                        attempt, delay)
            await anyio.sleep(delay)

    async def json(self, method: str, url: str, **kwargs: Any) -> Any:
        response = await self.send(method, url, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        # pydantic's JSON parser (a dependency already): twice as fast as the standard
        # library's on a listing of 10,000 objects, which a cold mount waits for.
        return pydantic_core.from_json(response.content)

