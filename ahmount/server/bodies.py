"""Request bodies: JSON bodies validated against their schema with a size bound, and exact
reads from a streamed body (batches of blobs back to back).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import ClientDisconnect, Request

from ahmount import errors
from ahmount.server import schemas

#: The largest JSON body: a commit of 100,000 objects (the most one call may carry) fits.
MAX_JSON_BODY = 64 << 20
UPLOAD_BUFFER = 8 << 20


async def json_body(request: Request, model: type[schemas.Body]) -> Any:
    """The request's JSON body, validated as ``model`` (400 naming the bad fields).

    A declared length over :data:`MAX_JSON_BODY` is refused (413) before a byte is read;
    an undeclared one is counted while it streams, so memory never holds more than that."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_JSON_BODY):
        raise errors.TooLarge(f"request body of {declared} bytes is over the "
                              f"{MAX_JSON_BODY} bytes a JSON body may have")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BODY:
            raise errors.TooLarge(f"request body is over the {MAX_JSON_BODY} bytes a JSON "
                                  "body may have")
    return schemas.parse(model, bytes(body))


class BodyReader:
    """Reads a request body in exact amounts (for batches of blobs in one body)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._done = False

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; fewer only at the end of the body."""
        while len(self._buffer) < size and not self._done:
            try:
                self._buffer += await self._chunks.__anext__()
            except (StopAsyncIteration, ClientDisconnect):
                self._done = True
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    async def drain(self) -> None:
        """Consume the rest of the body (a client's stream ends cleanly, keep-alive works)."""
        while await self.read(UPLOAD_BUFFER):
            pass

    async def readline(self, limit: int) -> bytes:
        while b"\n" not in self._buffer and not self._done and len(self._buffer) <= limit:
            try:
                self._buffer += await self._chunks.__anext__()
            except (StopAsyncIteration, ClientDisconnect):
                self._done = True
        line, sep, _ = bytes(self._buffer).partition(b"\n")
        if not sep:
            raise errors.InvalidArgument("batch upload has no manifest line")
        del self._buffer[: len(line) + 1]
        return line
