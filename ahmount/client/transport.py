"""The HTTP transport of our clients: httpcore's connection pool over a network backend whose
streams read the socket in large pieces.

httpcore's HTTP/1.1 connection asks its stream for 64 KiB at a time, and every read is a trip
through h11 and four async iterators: streaming a multi-GiB object that way costs more CPU
than the bytes do. A read returns what the socket has, so a larger bound only means fewer
trips. Rather than patch httpcore's class for the whole process (every other httpx user in a
training script would inherit it), the larger bound lives in the streams this transport's
own pool makes; everything else is httpx's and httpcore's public API.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpcore
import httpx
import sniffio

READ_BYTES = 1 << 20
#: httpx's own defaults.
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20,
                              keepalive_expiry=5.0)

# httpcore's exceptions, as the httpx ones callers catch (the same pairs httpx maps).
_MAPPED: list[tuple[type[Exception], type[httpx.TransportError]]] = [
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.ProtocolError, httpx.ProtocolError),
]


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except httpcore.ConnectionNotAvailable as exc:
        raise httpx.PoolTimeout(str(exc)) from exc
    except Exception as exc:
        for source, target in _MAPPED:
            if isinstance(exc, source):
                raise target(str(exc)) from exc
        raise


class _LargeReads(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max(max_bytes, READ_BYTES), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        return _LargeReads(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _LargeReadBackend(httpcore.AsyncNetworkBackend):
    """trio's or anyio's backend (whichever loop runs), with large reads."""

    @staticmethod
    def _backend() -> httpcore.AsyncNetworkBackend:
        if sniffio.current_async_library() == "trio":
            return httpcore.TrioBackend()
        return httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        return _LargeReads(await self._backend().connect_tcp(
            host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        return _LargeReads(await self._backend().connect_unix_socket(
            path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._backend().sleep(seconds)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        # Closed explicitly, also when the reader stops early: left to the garbage collector,
        # the pool's generator would be finalized on whatever loop runs then.
        parts = self._inner.__aiter__()
        try:
            with _mapped_errors():
                async for part in parts:
                    yield part
        finally:
            if hasattr(parts, "aclose"):
                with _mapped_errors():
                    await parts.aclose()

    async def aclose(self) -> None:
        if hasattr(self._inner, "aclose"):
            with _mapped_errors():
                await self._inner.aclose()


class LargeReadTransport(httpx.AsyncBaseTransport):
    """An httpx transport (TCP, or a Unix socket with ``uds``) reading in 1 MiB pieces."""

    def __init__(self, *, uds: str | None = None,
                 limits: httpx.Limits = DEFAULT_LIMITS) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            uds=uds,
            network_backend=_LargeReadBackend(),
        )

    async def __aenter__(self) -> LargeReadTransport:
        await self._pool.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        with _mapped_errors():
            await self._pool.__aexit__(*exc_info)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _mapped_errors():
            response = await self._pool.handle_async_request(core)
        return httpx.Response(status_code=response.status, headers=response.headers,
                              stream=_ResponseStream(response.stream),
                              extensions=response.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()
