"""The proxy over its upstream pool (http/proxy.py with http/upstream.py): requests share kept-alive
connections, a small answer and a large one both come back whole, and the app's shutdown closes
every upstream connection. Real sidecar apps, a real upstream on 127.0.0.1 and real Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from tests.conftest import SidecarFactory
from tests.helpers import ACME, ServerFactory, answering, quota_policy

HEADERS = {"X-API-Key": ACME}
LARGE = b"L" * (1024 * 1024)


async def answer(request: web.Request) -> web.Response:
    assert request.transport is not None
    port = str(request.transport.get_extra_info("peername")[1])
    if request.query.get("size") == "large":
        return web.Response(body=LARGE, headers={"X-Peer": port})
    return web.Response(text=port, headers={"X-Peer": port})


async def test_requests_share_a_kept_alive_upstream_connection_and_come_back_whole(
    sidecar: SidecarFactory, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    server = await aiohttp_server(answering(answer), host="127.0.0.1")
    client = await sidecar(quota_policy(tmp_path, 100), str(server.make_url("")).rstrip("/"))
    peers = set()
    for query in ("", "?size=large", "", "?size=large"):
        response = await client.get(f"/v1/search{query}", headers=HEADERS)
        body = await response.read()
        assert response.status == 200
        assert body == (LARGE if query else response.headers["X-Peer"].encode())
        assert "RateLimit" in response.headers
        peers.add(response.headers["X-Peer"])
    assert len(peers) == 1


async def test_shutdown_closes_every_upstream_connection(
    sidecar: SidecarFactory, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    server = await aiohttp_server(answering(answer), host="127.0.0.1")
    client = await sidecar(quota_policy(tmp_path, 100), str(server.make_url("")).rstrip("/"))
    await asyncio.gather(*(client.get("/v1/search", headers=HEADERS) for _ in range(3)))
    assert server.runner is not None and server.runner.server is not None
    assert server.runner.server.connections
    await client.close()
    async with asyncio.timeout(5):
        while server.runner.server.connections:
            await asyncio.sleep(0.01)
