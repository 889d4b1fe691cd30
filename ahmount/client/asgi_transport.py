"""An httpx transport that calls an ASGI app in-process and *streams* both ways.

httpx's own ``ASGITransport`` collects the whole response body before returning, which would
hold a multi-GiB object in memory. Here the app runs as a task in a task group that the
transport owns (entered with the client), and body chunks travel through a small memory
channel, so memory stays bounded by a few chunks whatever the object size. Closing the
response early cancels the app's task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

Message = dict[str, Any]


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(
        self, chunks: MemoryObjectReceiveStream[bytes], cancel: anyio.CancelScope
    ) -> None:
        self._chunks = chunks
        self._cancel = cancel

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        self._cancel.cancel()
        await self._chunks.aclose()


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """Serve requests with ``app`` in this process. Must be entered (``async with``) before
    use; httpx.AsyncClient does that when the client is entered."""

    def __init__(self, app: Any, buffered_chunks: int = 4) -> None:
        self.app = app
        self._buffered = buffered_chunks
        self._group: TaskGroup | None = None

    async def __aenter__(self) -> StreamingASGITransport:
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._group is not None
        self._group.cancel_scope.cancel()
        # The caller's own exception is not handed to the group: it must propagate as it is,
        # not wrapped in an ExceptionGroup. The app tasks catch their own errors.
        group, self._group = self._group, None
        await group.__aexit__(None, None, None)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._group is None:
            raise RuntimeError("StreamingASGITransport used outside 'async with'")
        assert isinstance(request.stream, httpx.AsyncByteStream)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": ("127.0.0.1", 0),
            "root_path": "",
        }
        body = request.stream.__aiter__()
        body_done = False
        response_done = anyio.Event()
        started = anyio.Event()
        head: dict[str, Any] = {}
        failure: list[BaseException] = []
        body_failure: list[Exception] = []
        chunk_tx, chunk_rx = anyio.create_memory_object_stream[bytes](self._buffered)
        cancel = anyio.CancelScope()

        async def receive() -> Message:
            nonlocal body_done
            if body_done:
                await response_done.wait()
                return {"type": "http.disconnect"}
            try:
                data = await body.__anext__()
            except StopAsyncIteration:
                body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            except Exception as exc:
                # The client's body failed (a file it streams vanished): over a socket the
                # server would see the client go away, and the client its own error.
                body_done = True
                body_failure.append(exc)
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": data, "more_body": True}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                head["status"] = message["status"]
                head["headers"] = message.get("headers", [])
                started.set()
            elif message["type"] == "http.response.body":
                data = message.get("body", b"")
                if data and request.method != "HEAD":
                    await chunk_tx.send(data)
                if not message.get("more_body", False):
                    response_done.set()
                    await chunk_tx.aclose()

        async def run() -> None:
            with cancel:
                try:
                    await self.app(scope, receive, send)
                except Exception as exc:  # the app already answered 500 if it could
                    if not started.is_set():
                        failure.append(exc)
                finally:
                    response_done.set()
                    started.set()
                    await chunk_tx.aclose()

        self._group.start_soon(run)
        await started.wait()
        if body_failure:
            cancel.cancel()
            raise body_failure[0]
        if failure and "status" not in head:
            raise failure[0]
        return httpx.Response(
            status_code=head["status"],
            headers=head["headers"],
            stream=_ResponseStream(chunk_rx, cancel),
            request=request,
        )
