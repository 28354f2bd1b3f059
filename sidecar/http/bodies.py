"""A request body that may be read in part before admission and is still forwarded whole.

A reserve such as ``request.json:max_tokens`` needs the request's JSON before the store call. The
body is read into memory only then, and only up to measure.JSON_CAPTURE_LIMIT bytes; a longer
body cannot be read (the reserve falls back to its default) and is forwarded as it streams in.

Every read waits at most ``idle_timeout`` for the next bytes (--body-timeout), then raises
BodyStalled: the head deadline (intake.py) ends when the head is in, and a body may then stall.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import StreamReader

from sidecar.admission.sources import JSON_CAPTURE_LIMIT
from sidecar.errors import BodyStalled


class RequestBody:
    def __init__(self, content: StreamReader, chunk_size: int, idle_timeout: float) -> None:
        self._content = content
        self._chunk_size = chunk_size
        self._idle_timeout = idle_timeout
        self._head = b""
        self._whole = False

    async def read_head(self) -> bytes | None:
        """The whole body if it fits in JSON_CAPTURE_LIMIT bytes, else None; read once."""
        parts: list[bytes] = []
        size = 0
        while size <= JSON_CAPTURE_LIMIT:
            part = await self._read(JSON_CAPTURE_LIMIT + 1 - size)
            if not part:
                self._whole = True
                break
            parts.append(part)
            size += len(part)
        self._head = b"".join(parts)
        return self._head if self._whole else None

    def buffered(self) -> bytes | None:
        """The whole body when it is in memory already (read ahead, or come with the head), else
        None: such a body goes to the upstream in one write with the request head."""
        content = self._content
        if not self._whole and content.is_eof() and content.exception() is None:
            self._head += content.read_nowait(-1)
            self._whole = True
        return self._head if self._whole else None

    async def chunks(self) -> AsyncIterator[bytes]:
        """What was read ahead, then the rest as it arrives."""
        if self._head:
            yield self._head
        if not self._whole:
            while chunk := await self._read(self._chunk_size):
                yield chunk

    async def _read(self, size: int) -> bytes:
        try:
            async with asyncio.timeout(self._idle_timeout):
                return await self._content.read(size)
        except TimeoutError:
            raise BodyStalled(self._idle_timeout) from None
