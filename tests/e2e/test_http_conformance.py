"""The proxy against the HTTP specifications (SPEC §4, issue 15): RateLimit fields as the draft
reads them, Expect: 100-continue after admission, Via, Proxy-* fields and the customer's key.

Real sidecar apps, real upstreams on 127.0.0.1 and real Redis; the Expect tests talk to the
sidecar over a raw socket, because a client library would send the body on its own schedule.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import SidecarFactory, Upstream, key_hash, write_policy

KEY = "acme-key-1"
HEADERS = {"X-API-Key": KEY}
ServerFactory = Callable[..., Awaitable[TestServer]]
READ_TIMEOUT = 5.0


def policy(tmp_path: Path, *, identity: str = "", limits: str = "") -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        {identity}
        meters:
          requests: {{aggregation: count}}
          tokens: {{aggregation: sum, source: "response.header:X-Usage-Tokens"}}
          egress: {{aggregation: sum, source: response.bytes}}
          ingress: {{aggregation: sum, source: request.bytes}}
        features:
          - {{name: health, match: {{path: /healthz}}, public: true}}
          - {{name: search, match: {{path: /v1/search}}}}
          - {{name: upload, match: {{method: POST, path: /v1/upload}}}}
        plans:
          p:
            features: [search, upload]
            limits:
              {limits or "- {meter: requests, limit: 100, period: month}"}
        customers: {{acme: {{plan: p, api_keys: ["{key_hash(KEY)}"]}}}}
        """,
    )


async def serve(
    aiohttp_server: ServerFactory, handler: Callable[[web.Request], Awaitable[web.Response]]
) -> str:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("")).rstrip("/")


def names(field: str) -> list[str]:
    """The item names of a RateLimit field, in order."""
    return [item.split(";")[0].strip().strip('"') for item in field.split(",")]


def seen_headers(upstream: Upstream, index: int = -1) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in cast(list[list[str]], upstream.seen[index]["headers"]):
        seen.setdefault(name.lower(), []).append(value)
    return seen


# --- RateLimit fields (item 6) ------------------------------------------------------------------


async def test_a_byte_meter_carries_the_registered_content_bytes_unit(
    sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream
) -> None:
    limits = """
              - {meter: requests, limit: 100, period: month}
              - {meter: egress, limit: 1000000, period: month}
              - {meter: ingress, limit: 1000000, period: day}
              - {meter: tokens, limit: 5000, period: month}"""
    client = await sidecar(policy(tmp_path, limits=limits), upstream.url)
    response = await client.get("/v1/search", headers=HEADERS)
    items = {names(item)[0]: item for item in response.headers["RateLimit-Policy"].split(", ")}
    assert items["egress-month"].endswith(';qu="content-bytes"')
    assert items["ingress-day"].endswith(';qu="content-bytes"')
    assert "sc-qu" not in items["egress-month"] + items["ingress-day"]
    assert items["tokens-month"].endswith(';sc-qu="tokens"')
    assert "qu=" not in items["requests-month"]


async def test_the_upstreams_own_ratelimit_items_follow_the_sidecars(
    sidecar: SidecarFactory, tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    async def limited(request: web.Request) -> web.Response:
        return web.Response(
            text="ok",
            headers={
                "RateLimit-Policy": '"upstream-burst";q=10;w=60',
                "RateLimit": '"upstream-burst";r=9;t=30',
            },
        )

    client = await sidecar(policy(tmp_path), await serve(aiohttp_server, limited))
    response = await client.get("/v1/search", headers=HEADERS)
    (policy_field,) = response.headers.getall("RateLimit-Policy")
    assert names(policy_field) == ["requests-month", "upstream-burst"]
    assert policy_field.endswith(', "upstream-burst";q=10;w=60')
    assert names(response.headers["RateLimit"]) == ["requests-month", "upstream-burst"]
    assert response.headers["RateLimit"].endswith(', "upstream-burst";r=9;t=30')
    public = await client.get("/healthz")  # no limit applies: the upstream's fields pass as sent
    assert public.headers["RateLimit"] == '"upstream-burst";r=9;t=30'


async def test_ratelimit_policy_keeps_one_order_for_a_customer_and_route(
    sidecar: SidecarFactory, tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    """Ordered by the remaining share, the items swapped places once the tokens ran down."""

    async def spending(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"X-Usage-Tokens": request.query.get("tokens", "0")})

    limits = """
              - {meter: requests, limit: 100, period: month}
              - {meter: tokens, limit: 1000, period: month}"""
    client = await sidecar(policy(tmp_path, limits=limits), await serve(aiohttp_server, spending))
    orders = []
    for tokens in (0, 700, 200, 0):
        response = await client.get(f"/v1/search?tokens={tokens}", headers=HEADERS)
        orders.append((names(response.headers["RateLimit-Policy"]), names(response.headers["RateLimit"])))
    assert '"tokens-month";r=100;' in response.headers["RateLimit"]  # it did run down
    assert orders == [(["requests-month", "tokens-month"], ["requests-month", "tokens-month"])] * 4


# --- Expect: 100-continue (item 7) ---------------------------------------------------------------


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
    status_line, *lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines if line)
    return int(status_line.split()[1]), {name.lower(): value for name, value in fields.items()}


async def final_answer(reader: asyncio.StreamReader) -> tuple[list[int], int, dict[str, str], bytes]:
    """The interim statuses received, then the final status, its header fields and its body."""
    interim = []
    status, fields = await read_head(reader)
    while status < 200:
        interim.append(status)
        status, fields = await read_head(reader)
    body = await asyncio.wait_for(reader.readexactly(int(fields.get("content-length", "0"))), READ_TIMEOUT)
    return interim, status, fields, body


def expecting(key: str | None, length: int, path: str = "/v1/upload") -> bytes:
    key_line = f"X-API-Key: {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: api\r\n{key_line}Content-Type: application/json\r\n"
        f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("refusal", ["quota-used-up", "no-key"])
async def test_a_refused_client_that_expects_100_continue_never_gets_it_and_never_uploads(
    sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream, refusal: str
) -> None:
    limits = "- {meter: requests, limit: 1, period: day}"
    client = await sidecar(policy(tmp_path, limits=limits), upstream.url)
    assert (await client.post("/v1/upload", data=b"{}", headers=HEADERS)).status == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(expecting(KEY if refusal == "quota-used-up" else None, 50 * 1024 * 1024))
        interim, status, fields, body = await final_answer(reader)  # the body is held back, as curl does
    finally:
        writer.close()
    assert interim == []
    assert status == (429 if refusal == "quota-used-up" else 401)
    assert json.loads(body)["status"] == status
    # Whether the client sends the body now is its choice: the connection cannot carry another request.
    assert fields["connection"] == "close"
    assert len(upstream.seen) == 1


async def test_an_admitted_client_that_expects_100_continue_gets_it_then_the_upstreams_answer(
    sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy(tmp_path), upstream.url)
    body = b'{"hello": "world"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(expecting(KEY, len(body)))
        status, _ = await read_head(reader)
        assert status == 100
        writer.write(body)
        interim, status, _, answer = await final_answer(reader)
    finally:
        writer.close()
    assert (interim, status) == ([], 200)
    assert json.loads(answer)["body_length"] == len(body)
    assert "expect" not in seen_headers(upstream)


async def test_100_continue_comes_before_admission_reads_the_body_for_a_reserve(
    sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream
) -> None:
    """A request.json reserve needs the body to be admitted: 100 Continue asks for it first."""
    path = write_policy(
        tmp_path,
        f"""
        version: 1
        meters:
          tokens: {{aggregation: sum, source: "response.header:X-Usage-Tokens",
                    reserve: "request.json:max_tokens", reserve_default: 10}}
        features: [{{name: upload, match: {{method: POST, path: /v1/upload}}}}]
        plans: {{p: {{features: [upload], limits: [{{meter: tokens, limit: 1000, period: month}}]}}}}
        customers: {{acme: {{plan: p, api_keys: ["{key_hash(KEY)}"]}}}}
        """,
        name="reserve.yaml",
    )
    client = await sidecar(path, upstream.url)
    body = b'{"max_tokens": 300}'
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(expecting(KEY, len(body)))
        status, _ = await read_head(reader)
        assert status == 100
        writer.write(body)
        interim, status, _, _ = await final_answer(reader)
    finally:
        writer.close()
    assert (interim, status) == ([], 200)
    assert len(upstream.seen) == 1


# --- Via, Proxy-* and the customer's key (item 9) --------------------------------------------------


async def test_via_is_appended_to_what_the_client_sent(
    sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy(tmp_path), upstream.url)
    await client.get("/v1/search", headers=HEADERS)
    await client.get("/v1/search", headers=HEADERS | {"Via": "1.0 fred, 1.1 p.example.net"})
    assert seen_headers(upstream, 0)["via"] == ["1.1 quota-sidecar"]
    assert seen_headers(upstream, 1)["via"] == ["1.0 fred, 1.1 p.example.net, 1.1 quota-sidecar"]


async def test_proxy_fields_are_dropped_both_ways_except_proxy_status(
    sidecar: SidecarFactory, tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    received: list[dict[str, str]] = []

    async def proxied(request: web.Request) -> web.Response:
        received.append({name.lower(): value for name, value in request.headers.items()})
        answer = {
            "Proxy-Status": "origin-cache; hit",
            "Proxy-Authenticate": 'Basic realm="upstream"',
            "Proxy-Foo": "1",
            "Proxy": "http://evil.example:3128",
        }
        return web.Response(text="ok", headers=answer)

    client = await sidecar(policy(tmp_path), await serve(aiohttp_server, proxied))
    sent = {"Proxy-Foo": "1", "Proxy": "http://evil.example:3128", "Proxy-Authorization": "Basic eA=="}
    response = await client.get("/v1/search", headers=HEADERS | sent | {"Proxyish": "kept"})
    assert not any(name == "proxy" or name.startswith("proxy-") for name in received[0])
    assert received[0]["proxyish"] == "kept"
    assert response.headers["Proxy-Status"] == "origin-cache; hit"
    assert {"Proxy-Authenticate", "Proxy-Foo", "Proxy"}.isdisjoint(response.headers)


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        ({"X-API-Key": KEY}, set()),
        ({"Authorization": f"Bearer {KEY}"}, set()),
        ({"X-API-Key": KEY, "Authorization": "Basic dXNlcjpwdw=="}, {"authorization"}),
    ],
    ids=["x-api-key", "bearer", "basic-is-the-upstreams"],
)
async def test_the_customers_key_does_not_reach_the_upstream(
    sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream, sent: dict[str, str], forwarded: set[str]
) -> None:
    identity = "identity: {api_key_headers: [X-API-Key, Authorization]}"
    client = await sidecar(policy(tmp_path, identity=identity), upstream.url)
    assert (await client.get("/v1/search", headers=sent)).status == 200
    seen = seen_headers(upstream)
    assert {"x-api-key", "authorization"} & set(seen) == forwarded
    assert seen["x-customer-id"] == ["acme"]


async def test_identity_forward_key_passes_the_key_on(
    sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream
) -> None:
    identity = "identity: {forward_key: true}"
    client = await sidecar(policy(tmp_path, identity=identity), upstream.url)
    await client.get("/v1/search", headers={"Authorization": f"Bearer {KEY}"})
    await client.get("/v1/search", headers=HEADERS)
    assert seen_headers(upstream, 0)["authorization"] == [f"Bearer {KEY}"]
    assert seen_headers(upstream, 1)["x-api-key"] == [KEY]
