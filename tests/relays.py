"""A TCP relay in front of a real Redis that loses one reply on purpose: the connection is cut
when the reply arrives, as a Redis that exits right after running a command cuts it (bench/soak.py
found it with SIGTERM). It makes the lost-reply race deterministic."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class ReplyDropper:
    """A loopback TCP relay to Redis. Once `armed`, the next reply Redis sends on any connection is
    not relayed: that connection is cut instead, as a Redis that exits right after running a
    command cuts it."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.armed = False
        self.passed = 0  # replies to relay before the one dropped, once armed
        self.delay = 0.0  # seconds the dropped reply is held before its connection is cut
        self.dropped = 0
        self.url = ""
        self.relays: list[tuple[asyncio.Task[object], asyncio.StreamWriter]] = []

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection(*self.target)
        task = asyncio.current_task()
        assert task is not None
        self.relays.append((task, redis_writer))
        to_redis = asyncio.create_task(_pipe(reader, redis_writer))
        try:
            while data := await redis_reader.read(65536):
                if self.armed and self.passed > 0:
                    self.passed -= 1
                elif self.armed:
                    self.armed = False
                    await asyncio.sleep(self.delay)
                    self.dropped += 1
                    writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()
        finally:
            to_redis.cancel()
            redis_writer.close()
            writer.close()

    async def close(self) -> None:
        """Cut every relayed connection on the Redis side and wait for the relays to end."""
        for _task, redis_writer in self.relays:
            redis_writer.transport.abort()
        await asyncio.gather(*(task for task, _ in self.relays), return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@contextlib.asynccontextmanager
async def reply_dropper(redis_url: str) -> AsyncIterator[ReplyDropper]:
    """A ReplyDropper listening on a free loopback port; ``url`` is where to point a client."""
    relay = ReplyDropper(redis_url)
    server = await asyncio.start_server(relay.relay, "127.0.0.1", 0)
    relay.url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    try:
        yield relay
    finally:
        server.close()
        await relay.close()
