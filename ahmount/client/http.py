"""The HTTP session of a hub client: one httpx client, retries with backoff, failing fast
for a moment after a hub was found down, and the one decoding of an error response into the
domain exception tree (:func:`raise_for_response`). Endpoints live in :mod:`hub_client`,
transfers to and from disk in :mod:`files` and :mod:`uploads`.
"""

from __future__ import annotations

import functools
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
from ahmount.client.answers import RETRYABLE_STATUS, raise_for_response
from ahmount.client.direct_reads import (
    CONNECT_SECONDS,
    Consume,
    DirectReads,
    HeadSeen,
    Retryable,
)
from ahmount.client.transport import LargeReadTransport

log = logging.getLogger("ahmount.client")

#: Bytes per read and write of a transfer.
CHUNK = 1 << 20
#: Times one read asks again for what is left of an answer that broke off mid-body (a
#: dropped connection: a request's own retries cover only failures before the body), each
#: after :meth:`HttpSession.retry_delay`: a range's rest, or a batch's objects not yet sent.
READ_RESUMES = 3
Progress = Callable[[int], None]


@functools.lru_cache(maxsize=4096)
def _parsed(url: str) -> httpx.URL:
    """``url`` parsed once: httpx checks a URL a character at a time, 0.16 ms for a read URL
    (its signed query) on each of a random reader's misses, half as much again as the rest
    of the request; the same blob's URL serves many."""
    return httpx.URL(url)


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
        uds = base_url[len("unix:"):] if base_url.startswith("unix:") else None
        #: Bulk reads straight into buffers (:mod:`direct_reads`): only over a socket.
        self.direct = DirectReads(timeout, httpx.create_ssl_context(), uds) \
            if transport is None else None
        if uds is not None:
            transport = transport or LargeReadTransport(uds=uds)
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
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_SECONDS)),
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
        if self.direct is not None:
            self.direct.close()
        await self._http.__aexit__(exc_type, exc, tb)

    def _fail_fast(self, method: str, url: str) -> None:
        if self._down_until > time.monotonic():
            raise errors.HubUnavailable(
                f"hub at {self.base_url} is unreachable (failing fast for a moment): "
                f"{method} {url}", path=url)

    def _given_up(self, method: str, url: str, failure: BaseException) -> errors.HubUnavailable:
        self._down_until = time.monotonic() + self.down_for
        self.reachable = False
        return errors.HubUnavailable(
            f"hub at {self.base_url} is unreachable ({method} {url}): {failure}", path=url)

    def retry_delay(self, attempt: int) -> float:
        """The pause before the ``attempt``-th retry: exponential, jittered."""
        return float(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))

    def read_into(self, url: str, length: int, buffer: memoryview, consume: Consume, *,
                  headers: dict[str, str], params: dict[str, str] | None = None,
                  on_head: HeadSeen | None = None, aside: bool = False) -> int:
        """A ranged GET of ``length`` bytes read into ``buffer`` by :attr:`direct` (which
        must exist), for a worker thread: the same retries, failing fast and error mapping
        as :meth:`send`. Returns the bytes read (fewer only when ``consume`` stopped).
        ``on_head`` is shown the answer's headers before its body is read. ``aside``: as
        :meth:`send`'s."""
        assert self.direct is not None
        self._fail_fast("GET", url)
        request = self._request("GET", url, aside, headers=headers, params=params)
        attempt = 0
        while True:
            try:
                done = self.direct.read_into(request, length, buffer, consume, on_head)
            except Retryable as exc:
                if aside:
                    raise
                attempt += 1
                if attempt > self.retries:
                    raise self._given_up("GET", url, exc) from exc
                delay = self.retry_delay(attempt)
                log.warning("GET %s failed (%s); retry %d in %.1fs", url, exc, attempt, delay)
                time.sleep(delay)  # a worker thread's backoff (send's is anyio.sleep)
                continue
            except errors.AhError:
                self.last_answer = time.time()  # an error answer is an answer
                self.reachable = True
                raise
            self.last_answer = time.time()
            self.reachable = True
            return done

    def _request(self, method: str, url: str, aside: bool, **kwargs: Any) -> httpx.Request:
        request = self._http.build_request(method, _parsed(url), **kwargs)
        if aside:
            # A read URL's signature is its caller's key: ours stays with the API.
            request.headers.pop("authorization", None)
        return request

    async def send(self, method: str, url: str, *, stream: bool = False, aside: bool = False,
                   repeatable: bool = False, **kwargs: Any) -> httpx.Response:
        """Send with retries; returns a successful response (streamed if ``stream``).

        ``aside``: ``url`` is the hub's data plane (an absolute read URL): sent once and
        without the API key; a failure on the way raises :class:`Retryable` at once and
        says nothing of whether the hub's API is reachable. ``repeatable``: a request of
        another method that is safe to send again after a failure on the way, as GET is (a
        commit with an ``Idempotency-Key``, whose repeat gets the first answer)."""
        idempotent = repeatable or method in ("GET", "HEAD", "PUT", "DELETE")
        self._fail_fast(method, url)
        attempt = 0
        while True:
            try:
                follow = kwargs.pop("follow_redirects", False)
                request = self._request(method, url, aside, **kwargs)
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
                if aside:  # once: a failure is the caller's to route around
                    if response.status_code in RETRYABLE_STATUS:
                        await response.aclose()
                        raise Retryable(f"{method} {url}: answered {response.status_code}")
                    if response.status_code >= 400:
                        body = await response.aread()
                        await response.aclose()
                        raise_for_response(response, body)
                    return response
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
            if aside:
                raise Retryable(f"{method} {url}: {failure}") from failure
            attempt += 1
            if attempt > self.retries or ("content" in kwargs and not isinstance(
                kwargs["content"], bytes | str
            )):
                raise self._given_up(method, url, failure) from failure
            delay = self.retry_delay(attempt)
            log.warning("%s %s failed (%s); retry %d in %.1fs", method, url, failure,
                        attempt, delay)
            await anyio.sleep(delay)

    async def json(self, method: str, url: str, **kwargs: Any) -> Any:
        response = await self.send(method, url, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        # pydantic's JSON parser (a dependency already): twice as fast as the standard
        # library's on a listing of 10,000 objects, which a cold mount waits for.
        try:
            return pydantic_core.from_json(response.content)
        except ValueError:
            # Not the hub's answer (a proxy's or a portal's page in its place): the hub
            # failing, which callers (and the mount's background tasks) ride out, not a
            # bug of ours.
            kind = response.headers.get("content-type", "no content type")
            raise errors.HubUnavailable(
                f"{method} {url}: the answer is not JSON ({kind}, "
                f"{response.content[:60]!r}): is something other than the hub answering "
                f"at {self.base_url}?", path=url) from None

