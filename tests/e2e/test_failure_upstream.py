"""What an upstream failure, or a client that leaves, does to usage (README "Failure behaviour").

The plan counts requests at admission, measures response bytes, and reserves 100 tokens at
admission that the response's X-Tokens header settles. Whatever happens after admission, the
request-time charge stands and the measured meters are charged with what was measured; the
reservation is settled only by a complete answer below 500, and released otherwise.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.store.redis.embedded import free_port
from tests.conftest import SidecarFactory
from tests.e2e.test_proxy_fidelity import Served, served_like_sidecar_run
from tests.helpers import Client, ServerFactory, key_hash, serve, write_policy

KEY = "acme-key-1"
HEADERS = {"X-API-Key": KEY}
BODY = b"x" * 1000
MB = 1024 * 1024


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters:
          requests: {{aggregation: count}}
          bytes: {{aggregation: sum, source: response.bytes}}
          tokens: {{aggregation: sum, source: "response.header:X-Tokens", reserve: 100}}
        features: [{{name: api, match: {{path: "/v1/{{name}}"}}}}]
        plans:
          p:
            features: [api]
            limits:
              - {{meter: requests, limit: 1000, period: day}}
              - {{meter: bytes, limit: 1000000000, period: day}}
              - {{meter: tokens, limit: 10000, period: day}}
        customers: {{acme: {{plan: p, api_keys: ["{key_hash(KEY)}"]}}}}
        """,
    )


async def ok(request: web.Request) -> web.Response:
    return web.Response(body=BODY, headers={"X-Tokens": "7"})


async def overloaded(request: web.Request) -> web.Response:
    return web.Response(status=503, body=BODY, headers={"X-Tokens": "7"})


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(2)
    return web.Response(body=BODY, headers={"X-Tokens": "7"})


async def breaks(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Length": str(10 * len(BODY)), "X-Tokens": "7"})
    await response.prepare(request)
    await response.write(BODY)
    assert request.transport is not None
    request.transport.close()
    return response


async def endless(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"X-Tokens": "7"})
    await response.prepare(request)
    while True:
        await response.write(BODY * 64)


ROUTES = {"/v1/ok": ok, "/v1/overloaded": overloaded, "/v1/slow": slow, "/v1/breaks": breaks}


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> str:
    app = web.Application()
    for path, handler in {**ROUTES, "/v1/endless": endless}.items():
        app.router.add_get(path, handler)
    return await serve(aiohttp_server, app)


async def usage(admin: Client) -> dict[str, int]:
    """Used per meter, from the admin usage document."""
    document = await (await admin.get("/admin/customers/acme/usage")).json()
    return {row["meter"]: row["used"] for row in document["limits"]}


async def exchange(session: aiohttp.ClientSession, served: Served, path: str) -> int:
    """The status the client saw (-1: its connection was cut mid-body), once the handler is done
    (so its response-time charge is in)."""
    async with session.get(f"http://127.0.0.1:{served.port}{path}", headers=HEADERS) as response:
        try:
            await response.read()
            status = response.status
        except aiohttp.ClientPayloadError:
            status = -1
    await asyncio.wait_for(served.handled.wait(), 5)
    return status


@pytest.mark.parametrize(
    ("path", "status", "used"),
    [
        pytest.param("/v1/ok", 200, {"requests": 1, "bytes": 1000, "tokens": 7}, id="complete"),
        pytest.param("/v1/overloaded", 503, {"requests": 1, "bytes": 1000, "tokens": 0}, id="5xx"),
        pytest.param("/v1/slow", 504, {"requests": 1, "bytes": 0, "tokens": 0}, id="too-slow"),
        pytest.param("/v1/breaks", -1, {"requests": 1, "bytes": 1000, "tokens": 0}, id="breaks-mid-body"),
        pytest.param("/v1/refused", 502, {"requests": 1, "bytes": 0, "tokens": 0}, id="refused"),
    ],
)
async def test_an_upstream_failure_keeps_the_admission_charge_charges_what_was_measured_and_releases_the_reservation(  # noqa: E501
    sidecar: SidecarFactory,
    policy: Path,
    upstream: str,
    redis_url: str,
    path: str,
    status: int,
    used: dict[str, int],
) -> None:
    target = f"http://127.0.0.1:{free_port()}" if path == "/v1/refused" else upstream
    admin = await sidecar(policy, target, admin=True)
    async with (
        served_like_sidecar_run(policy, target, redis_url, upstream_timeout=0.3) as served,
        aiohttp.ClientSession() as session,
    ):
        assert await exchange(session, served, path) == status
    assert await usage(admin) == used


async def test_a_client_that_leaves_mid_response_is_charged_what_it_was_sent_and_its_reservation_released(
    sidecar: SidecarFactory, policy: Path, upstream: str, redis_url: str
) -> None:
    admin = await sidecar(policy, upstream, admin=True)
    async with served_like_sidecar_run(policy, upstream, redis_url) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(f"GET /v1/endless HTTP/1.1\r\nHost: sidecar\r\nX-API-Key: {KEY}\r\n\r\n".encode())
        await asyncio.wait_for(reader.readexactly(4 * MB), 5)
        assert (await usage(admin))["tokens"] == 100  # held while the answer streams
        writer.transport.abort()
        await asyncio.wait_for(served.handled.wait(), 5)
    used = await usage(admin)
    assert (used["requests"], used["tokens"]) == (1, 0)
    assert 4 * MB <= used["bytes"] < 64 * MB  # what was sent before it left: at least what it read
