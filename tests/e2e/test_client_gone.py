"""A client that leaves before its answer is written is not an error.

`sidecar run` serves without handler cancellation (aiohttp's default), so a handler whose client
hung up keeps running until the upstream answers, and only then finds the connection closing.
aiohttp's test client cancels such handlers instead, so these tests serve the proxy app the way
`sidecar run` does, on an AppRunner of their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from sidecar.http.app import build_proxy_app
from sidecar.store.redis.embedded import free_port
from tests.conftest import make_components
from tests.helpers import ServerFactory, key_hash, serve, write_policy

ACME = "acme-key-1"
SETTLE_TIMEOUT = 5.0


class SlowUpstream:
    """Answers each request only once `release` is set; `arrived` is set when one came in."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.arrived.set()
        await self.release.wait()
        return web.json_response({"late": True})


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters: {{requests: {{aggregation: count}}}}
        features: [{{name: slow, match: {{path: /slow}}}}]
        plans:
          p: {{features: [slow], limits: [{{meter: requests, limit: 1000, period: day}}]}}
        customers:
          acme: {{plan: p, api_keys: ["{key_hash(ACME)}"]}}
        """,
    )


@pytest.fixture
async def proxy_port(
    policy: Path, redis_url: str, aiohttp_server: ServerFactory, slow: SlowUpstream
) -> AsyncIterator[int]:
    upstream_app = web.Application()
    upstream_app.router.add_get("/slow", slow.handle)
    components = make_components(policy, await serve(aiohttp_server, upstream_app), redis_url)
    runner = web.AppRunner(build_proxy_app(components), access_log=None)  # as `sidecar run`: no cancellation
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    slow.release.set()
    await runner.cleanup()
    await components.store.close()


@pytest.fixture
def slow() -> SlowUpstream:
    return SlowUpstream()


async def get(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {ACME}\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def test_a_client_gone_before_the_answer_is_logged_at_debug_only(
    proxy_port: int, slow: SlowUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sidecar.http.proxy")
    _, writer = await get(proxy_port)
    await asyncio.wait_for(slow.arrived.wait(), SETTLE_TIMEOUT)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.05)  # the sidecar sees the connection close before the upstream answers
    slow.release.set()
    async with asyncio.timeout(SETTLE_TIMEOUT):
        while "client left before the response" not in caplog.text:
            await asyncio.sleep(0.02)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_the_sidecar_keeps_serving_after_a_client_left(proxy_port: int, slow: SlowUpstream) -> None:
    _, gone = await get(proxy_port)
    await asyncio.wait_for(slow.arrived.wait(), SETTLE_TIMEOUT)
    gone.close()
    await gone.wait_closed()
    await asyncio.sleep(0.05)
    slow.release.set()
    reader, writer = await get(proxy_port)
    status = await asyncio.wait_for(reader.readline(), SETTLE_TIMEOUT)
    writer.close()
    assert status.startswith(b"HTTP/1.1 200")
