"""WebSocket upgrades through the sidecar (SPEC §4, issue 15 item 8): admitted like any request,
charged at the upgrade, relayed both ways, and metered in bytes sent to the client when it closes.

A real aiohttp WebSocket upstream on 127.0.0.1, aiohttp's WebSocket client, real Redis.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.http.app import build_proxy_app
from sidecar.http.intake import GuardedSite
from tests.conftest import SidecarFactory, key_hash, make_components, raw_exchange, write_policy

KEY = "acme-key-1"
HEADERS = {"X-API-Key": KEY}
GREETING = "hello from upstream"
ServerFactory = Callable[..., Awaitable[TestServer]]
Client = TestClient[web.Request, web.Application]
SEEN = web.AppKey("seen", list)


async def _stream(request: web.Request) -> web.StreamResponse:
    """Greets, echoes text with a prefix, reverses binary, and closes with 4001 when asked."""
    record = {name.lower(): value for name, value in request.headers.items()}
    request.app[SEEN].append(record)
    ws = web.WebSocketResponse(protocols=("chat.v2",))
    await ws.prepare(request)
    await ws.send_str(GREETING)
    async for message in ws:
        if message.type is WSMsgType.TEXT and message.data == "leave":
            await ws.close(code=4001, message=b"asked to")
        elif message.type is WSMsgType.TEXT:
            await ws.send_str(f"echo:{message.data}")
        elif message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data[::-1])
    record["closed with"] = str(ws.close_code)
    return ws


async def _forbidden(request: web.Request) -> web.Response:
    request.app[SEEN].append({})
    return web.Response(status=403, text="no sockets here")


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> tuple[str, list[dict[str, str]]]:
    app = web.Application()
    app[SEEN] = []
    app.router.add_get("/v1/stream", _stream)
    app.router.add_get("/v1/closed", _forbidden)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("")).rstrip("/"), app[SEEN]


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters:
          requests: {{aggregation: count}}
          egress: {{aggregation: sum, source: response.bytes}}
          ingress: {{aggregation: sum, source: request.bytes}}
        features:
          - {{name: stream, match: {{method: GET, path: /v1/stream}}, cost: {{requests: 5}}}}
          - {{name: closed, match: {{method: GET, path: /v1/closed}}}}
        plans:
          p:
            features: [stream, closed]
            limits:
              - {{meter: requests, limit: 9, period: day}}  # one stream (5) fits, not two
              - {{meter: egress, limit: 1000000, period: month}}
              - {{meter: ingress, limit: 1000000, period: month}}
        customers: {{acme: {{plan: p, api_keys: ["{key_hash(KEY)}"]}}}}
        """,
    )


async def used(client: Client) -> dict[str, int]:
    """Units used per meter, from the customer's own usage document."""
    response = await client.get("/_sidecar/usage", headers=HEADERS)
    return {limit["meter"]: limit["used"] for limit in (await response.json())["limits"]}


async def eventually_used(client: Client, meter: str, expected: int) -> int:
    """The charge at close lands once the sidecar has closed both sides; wait for it a little."""
    for _ in range(50):
        if (value := (await used(client))[meter]) == expected:
            return value
        await asyncio.sleep(0.05)
    return (await used(client))[meter]


async def test_a_websocket_is_relayed_both_ways_charged_at_the_upgrade_and_metered_at_close(
    sidecar: SidecarFactory, policy: Path, upstream: tuple[str, list[dict[str, str]]]
) -> None:
    url, seen = upstream
    client = await sidecar(policy, url)
    async with client.session.ws_connect(
        client.make_url("/v1/stream"), headers=HEADERS, protocols=("chat.v2",)
    ) as ws:
        assert ws.protocol == "chat.v2"
        assert await ws.receive_str() == GREETING
        assert await used(client) == {"requests": 5, "egress": 0, "ingress": 0}  # charged at the upgrade
        await ws.send_str("ping")
        assert await ws.receive_str() == "echo:ping"
        await ws.send_bytes(b"\x00\x01\x02")
        assert await ws.receive_bytes() == b"\x02\x01\x00"
    sent_to_client = len(GREETING) + len("echo:ping") + 3
    assert await eventually_used(client, "egress", sent_to_client) == sent_to_client
    assert (await used(client))["ingress"] == len("ping") + 3
    assert (await used(client))["requests"] == 5
    (headers,) = seen
    assert headers["x-customer-id"] == "acme" and "x-api-key" not in headers
    assert headers["via"] == "1.1 quota-sidecar"


async def test_a_client_that_vanishes_is_charged_what_it_was_sent_and_the_upstream_is_closed(
    sidecar: SidecarFactory, policy: Path, upstream: tuple[str, list[dict[str, str]]]
) -> None:
    url, seen = upstream
    client = await sidecar(policy, url)
    key = base64.b64encode(b"0123456789abcdef").decode()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(
        f"GET /v1/stream HTTP/1.1\r\nHost: api\r\nX-API-Key: {KEY}\r\nConnection: Upgrade\r\n"
        f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    frame = await asyncio.wait_for(reader.readexactly(2 + len(GREETING)), 5)  # unmasked, no extension
    writer.transport.abort()  # gone without a close frame
    assert head.startswith(b"HTTP/1.1 101 ")
    assert frame[2:] == GREETING.encode()
    assert await eventually_used(client, "egress", len(GREETING)) == len(GREETING)
    assert seen[0]["closed with"] == "1001"  # the sidecar closed the upstream's socket: going away


async def test_an_upstream_close_code_reaches_the_client(
    sidecar: SidecarFactory, policy: Path, upstream: tuple[str, list[dict[str, str]]]
) -> None:
    client = await sidecar(policy, upstream[0])
    async with client.session.ws_connect(client.make_url("/v1/stream"), headers=HEADERS) as ws:
        assert await ws.receive_str() == GREETING
        await ws.send_str("leave")
        assert (await ws.receive()).type is WSMsgType.CLOSE
    assert ws.close_code == 4001


async def test_a_refused_upgrade_is_429_before_any_upgrade(
    sidecar: SidecarFactory, policy: Path, upstream: tuple[str, list[dict[str, str]]]
) -> None:
    url, seen = upstream
    client = await sidecar(policy, url)
    async with client.session.ws_connect(client.make_url("/v1/stream"), headers=HEADERS) as ws:
        assert await ws.receive_str() == GREETING
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.session.ws_connect(client.make_url("/v1/stream"), headers=HEADERS)
    assert refused.value.status == 429
    assert len(seen) == 1
    assert (await used(client))["requests"] == 5


async def test_an_upgrade_the_upstream_refuses_passes_its_status_on(
    sidecar: SidecarFactory, policy: Path, upstream: tuple[str, list[dict[str, str]]]
) -> None:
    client = await sidecar(policy, upstream[0])
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.session.ws_connect(client.make_url("/v1/closed"), headers=HEADERS)
    assert refused.value.status == 403
    assert (await used(client))["requests"] == 1  # admitted and forwarded: its cost stands


async def test_a_broken_handshake_is_400_before_admission(
    sidecar: SidecarFactory, policy: Path, upstream: tuple[str, list[dict[str, str]]]
) -> None:
    url, seen = upstream
    client = await sidecar(policy, url)
    assert client.port is not None
    status, _ = await raw_exchange(
        client.port,
        f"GET /v1/stream HTTP/1.1\r\nHost: api\r\nX-API-Key: {KEY}\r\nConnection: Upgrade, close\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n",
    )
    assert status == 400
    assert seen == []
    assert (await used(client))["requests"] == 0


@pytest.fixture
async def guarded_url(
    redis_url: str, policy: Path, upstream: tuple[str, list[dict[str, str]]]
) -> AsyncIterator[str]:
    """The proxy app as `sidecar run` serves it: GuardedSite's connections, no handler cancellation,
    and a head deadline shorter than the pause the test makes on an open socket."""
    components = make_components(policy, upstream[0], redis_url, header_timeout=0.2)
    app = build_proxy_app(components)
    app.on_cleanup.append(lambda _: components.store.close())
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1, handle_signals=False)
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", 0, settings=components.settings, metrics=components.metrics)
    await site.start()
    yield f"http://127.0.0.1:{site.port}"
    await runner.cleanup()


async def test_a_socket_through_the_guarded_connection_outlives_the_head_deadline_and_is_metered(
    guarded_url: str, upstream: tuple[str, list[dict[str, str]]]
) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{guarded_url}/v1/stream", headers=HEADERS)
        assert await ws.receive_str() == GREETING
        await asyncio.sleep(0.4)  # twice the head deadline: a socket is not a head being sent
        await ws.send_str("late")
        assert await ws.receive_str() == "echo:late"
        await ws.close()
        for _ in range(50):
            usage = await session.get(f"{guarded_url}/_sidecar/usage", headers=HEADERS)
            egress = {limit["meter"]: limit["used"] for limit in (await usage.json())["limits"]}["egress"]
            if egress:
                break
            await asyncio.sleep(0.05)
    assert egress == len(GREETING) + len("echo:late")
    assert upstream[1][0]["closed with"] == "1000"
