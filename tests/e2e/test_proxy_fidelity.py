"""What the proxy does to a request and its response on the way through (SPEC §4, proxy.py).

Every test runs a real upstream (aiohttp_server on 127.0.0.1), a real sidecar and real Redis, and
checks one behaviour: bodies streamed both ways without being held whole in memory, paths and
query strings passed byte-for-byte, identity and hop-by-hop headers handled as RFC 9110 says,
upstream failures mapped to 502 / 504 / a cut connection, and nothing shared between customers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from sidecar.http.app import build_proxy_app
from sidecar.http.components import COMPONENTS, Components
from sidecar.metrics import Metrics
from sidecar.store.redis.embedded import free_port
from tests.conftest import SidecarFactory, make_components
from tests.helpers import (
    Client,
    Handler,
    ServerFactory,
    answering,
    key_hash,
    raw_exchange,
    serve,
    write_policy,
)

ACME, BOB = "acme-key-1", "bob-key-1"
MB = 1024 * 1024
PATTERN = bytes(range(256)) * (MB // 256)  # 1 MB, every byte value, so a shifted chunk shows
MEMORY_GROWTH_LIMIT = 100 * MB


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    """Two customers on a plan with a generous limit; `/files/...` matches any method."""
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters: {{requests: {{aggregation: count}}}}
        features:
          - {{name: files, match: {{path: "/files/{{name}}"}}}}
          - {{name: nested, match: {{path: "/files/{{dir}}/{{name}}"}}}}
        plans:
          big:
            features: [files, nested]
            limits: [{{meter: requests, limit: 1000000000, period: day}}]
        customers:
          acme: {{plan: big, api_keys: ["{key_hash(ACME)}"]}}
          bob: {{plan: big, api_keys: ["{key_hash(BOB)}"]}}
        """,
    )


def raw_url(client: Client, raw_path_qs: str) -> URL:
    """The sidecar's URL for a path and query sent exactly as written, never re-quoted."""
    return URL(f"http://127.0.0.1:{client.port}{raw_path_qs}", encoded=True)


def upstream_errors(client: Client, kind: str) -> float:
    return errors_of(client.app[COMPONENTS].metrics, kind)


def errors_of(metrics: Metrics, kind: str) -> float:
    return metrics.registry.get_sample_value("sidecar_upstream_errors_total", {"kind": kind}) or 0.0


def lower_headers(headers: list[list[str]]) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in headers:
        seen.setdefault(name.lower(), []).append(value)
    return seen


async def headers_seen(request: web.Request) -> web.Response:
    """Upstream that answers with the request headers it received, as [name, value] pairs."""
    return web.json_response({"headers": [[k, v] for k, v in request.headers.items()]})


def pattern_digest(chunks: int) -> str:
    """SHA-256 of PATTERN repeated, computed without building the body (that would move the peak)."""
    digest = hashlib.sha256()
    for _ in range(chunks):
        digest.update(PATTERN)
    return digest.hexdigest()


class PeakMemory:
    """Peak RSS growth of this process (sidecar, upstream and client all live in it).

    ru_maxrss is the high-water mark, so an earlier peak could hide growth; the sampled current
    RSS (from /proc, where there is one) is checked as well while the body flows.
    """

    def __init__(self) -> None:
        self.maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.rss_before = self._current()
        self.rss_peak = self.rss_before

    @staticmethod
    def _current() -> int:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * resource.getpagesize()
        except OSError:
            return 0

    def sample(self) -> None:
        self.rss_peak = max(self.rss_peak, self._current())

    @property
    def maxrss_growth(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.maxrss_before

    @property
    def sampled_growth(self) -> int:
        return self.rss_peak - self.rss_before


# --- bodies are streamed, never buffered whole ------------------------------------------------


async def test_large_response_streams_through_without_buffering(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory
) -> None:
    chunks = 200

    async def stream_200mb(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(chunks):
            await response.write(PATTERN)
        await response.write_eof()
        return response

    client = await sidecar(policy, await serve(aiohttp_server, answering(stream_200mb)))
    memory = PeakMemory()
    digest, length = hashlib.sha256(), 0
    async with asyncio.timeout(20):
        async with client.get("/files/big", headers={"X-API-Key": ACME}) as response:
            assert response.status == 200
            async for chunk in response.content.iter_chunked(MB):
                digest.update(chunk)
                length += len(chunk)
                memory.sample()
    assert (length, digest.hexdigest()) == (chunks * MB, pattern_digest(chunks))
    assert memory.maxrss_growth < MEMORY_GROWTH_LIMIT
    assert memory.sampled_growth < MEMORY_GROWTH_LIMIT


@pytest.mark.parametrize("declared_length", [True, False], ids=["content-length", "chunked"])
async def test_large_request_body_streams_to_upstream_intact(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory, declared_length: bool
) -> None:
    chunks = 100
    memory = PeakMemory()

    async def hash_upload(request: web.Request) -> web.Response:
        digest, length = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(MB):
            digest.update(chunk)
            length += len(chunk)
            memory.sample()
        return web.json_response(
            {
                "sha256": digest.hexdigest(),
                "length": length,
                "content_length": request.headers.get("Content-Length"),
                "transfer_encoding": request.headers.get("Transfer-Encoding"),
            }
        )

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            memory.sample()
            yield PATTERN

    client = await sidecar(policy, await serve(aiohttp_server, answering(hash_upload)))
    headers = {"X-API-Key": ACME, "Content-Type": "application/octet-stream"}
    if declared_length:
        headers["Content-Length"] = str(chunks * MB)
    async with asyncio.timeout(20):
        response = await client.put("/files/upload", data=upload(), headers=headers)
        assert response.status == 200
        seen = await response.json()
    assert (seen["length"], seen["sha256"]) == (chunks * MB, pattern_digest(chunks))
    if declared_length:
        assert (seen["content_length"], seen["transfer_encoding"]) == (str(chunks * MB), None)
    else:
        assert (seen["content_length"], seen["transfer_encoding"]) == (None, "chunked")
    assert memory.maxrss_growth < MEMORY_GROWTH_LIMIT
    assert memory.sampled_growth < MEMORY_GROWTH_LIMIT


# --- the request line: method, path and query as sent -----------------------------------------


async def echo_request_line(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"method": request.method, "raw_path": request.raw_path, "body": body.decode()})


@pytest.mark.parametrize(
    "query",
    [
        "a=1&a=2&a=3",
        "empty=&flag&=novalue&&",
        "plus=a+b&space=a%20b&encoded_plus=a%2Bb",
        "reserved=%2F%3F%23%26%3D%25%3B&unreserved_encoded=%7E%41",
        "utf8=caf%C3%A9&raw_utf8_lower=%c3%a9&sub=!$'()*,;:@/?",
    ],
    ids=["repeated", "empty", "plus", "reserved", "utf8"],
)
async def test_query_string_is_forwarded_byte_for_byte(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory, query: str
) -> None:
    client = await sidecar(policy, await serve(aiohttp_server, answering(echo_request_line)))
    response = await client.session.get(raw_url(client, f"/files/q?{query}"), headers={"X-API-Key": ACME})
    assert response.status == 200
    assert (await response.json())["raw_path"] == f"/files/q?{query}"


@pytest.mark.parametrize(
    "raw_path",
    # Features match the decoded path (a%2Fb is two segments there), the upstream gets the raw one.
    ["/files/caf%C3%A9%20%7E%41", "/files/a%2Fb", "/files/a+b;v=1", "/files/%25%32%46"],
    ids=["encoded-unreserved", "encoded-slash", "plus-and-params", "double-encoded"],
)
async def test_path_percent_encoding_is_preserved(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory, raw_path: str
) -> None:
    client = await sidecar(policy, await serve(aiohttp_server, answering(echo_request_line)))
    response = await client.session.get(raw_url(client, raw_path), headers={"X-API-Key": ACME})
    assert response.status == 200
    assert (await response.json())["raw_path"] == raw_path


async def test_absolute_form_request_target_forwards_its_path_and_query(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory
) -> None:
    client = await sidecar(policy, await serve(aiohttp_server, answering(echo_request_line)))
    status, body = await raw_exchange(
        client.port,
        "GET http://elsewhere.example/files/a%2Fb?x=%7E+1 HTTP/1.1\r\nHost: sidecar\r\n"
        f"Connection: close\r\nX-API-Key: {ACME}\r\n\r\n",
    )
    assert (status, json.loads(body)["raw_path"]) == (200, "/files/a%2Fb?x=%7E+1")


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_method_and_body_reach_the_upstream(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory, method: str
) -> None:
    client = await sidecar(policy, await serve(aiohttp_server, answering(echo_request_line)))
    response = await client.request(
        method, "/files/doc", data=f"body of {method} ✓", headers={"X-API-Key": ACME}
    )
    seen = await response.json()
    assert (response.status, seen["method"], seen["body"]) == (200, method, f"body of {method} ✓")


# --- the response: status, reason, headers, body as the upstream sent them --------------------


async def status_from_path(request: web.Request) -> web.Response:
    status = int(request.match_info["tail"].rsplit("/", 1)[-1])
    response = web.Response(status=status, reason=f"Upstream says {status}", headers={"X-Trace": "t-1"})
    if status not in (204, 304):
        response.body = f"status {status}".encode()
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
    response.headers.add("X-Multi", "one")
    response.headers.add("X-Multi", "two")
    return response


@pytest.mark.parametrize("status", [201, 204, 304, 418, 500])
async def test_upstream_status_reason_and_body_pass_back_unchanged(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory, status: int
) -> None:
    client = await sidecar(policy, await serve(aiohttp_server, answering(status_from_path)))
    response = await client.get(f"/files/{status}", headers={"X-API-Key": ACME})
    assert (response.status, response.reason) == (status, f"Upstream says {status}")
    assert await response.read() == (b"" if status in (204, 304) else f"status {status}".encode())


async def test_upstream_response_headers_pass_back_including_repeated_ones(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory
) -> None:
    client = await sidecar(policy, await serve(aiohttp_server, answering(status_from_path)))
    response = await client.get("/files/200", headers={"X-API-Key": ACME})
    assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]
    assert response.headers.getall("X-Multi") == ["one", "two"]
    assert response.headers["X-Trace"] == "t-1"
    assert response.headers["Content-Length"] == str(len(b"status 200"))


async def test_upstream_body_is_not_decompressed(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory
) -> None:
    compressed = gzip.compress(b"usage " * 10_000)

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    client = await sidecar(policy, await serve(aiohttp_server, answering(gzipped)))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        response = await session.get(client.make_url("/files/log"), headers={"X-API-Key": ACME})
        body = await response.read()
    assert body == compressed
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.headers["Content-Length"] == str(len(compressed))


async def test_head_gets_upstream_headers_and_no_body(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory
) -> None:
    async def document(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 1234, headers={"ETag": '"v1"', "X-Method": request.method})

    client = await sidecar(policy, await serve(aiohttp_server, answering(document)))
    head = await client.head("/files/doc", headers={"X-API-Key": ACME})
    assert (head.status, head.headers["ETag"], head.headers["X-Method"]) == (200, '"v1"', "HEAD")
    assert head.headers["Content-Length"] == "1234"
    assert await head.read() == b""
    follow_up = await client.get("/files/doc", headers={"X-API-Key": ACME})  # same keep-alive connection
    assert await follow_up.read() == b"x" * 1234


# --- identity and forwarding headers ----------------------------------------------------------


async def test_spoofed_identity_headers_never_reach_the_upstream(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory
) -> None:
    client = await sidecar(policy, await serve(aiohttp_server, answering(headers_seen)))
    status, body = await raw_exchange(
        client.port,
        "GET /files/me HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n"
        f"X-API-Key: {BOB}\r\n"
        "X-Customer-Id: acme\r\nx-customer-id: mallory\r\nX-CUSTOMER-ID: root\r\n"
        "X-Customer-Plan: enterprise\r\nx-cUsToMeR-pLaN: enterprise\r\n\r\n",
    )
    seen = lower_headers(json.loads(body)["headers"])
    assert status == 200
    assert (seen["x-customer-id"], seen["x-customer-plan"]) == (["bob"], ["big"])


async def test_repeated_headers_spelled_differently_all_reach_the_upstream(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory
) -> None:
    client = await sidecar(policy, await serve(aiohttp_server, answering(headers_seen)))
    _, body = await raw_exchange(
        client.port,
        "GET /files/me HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n"
        f"X-API-Key: {ACME}\r\n"
        "X-Tag: a\r\nx-tag: b\r\nX-TAG: c\r\n\r\n",
    )
    assert lower_headers(json.loads(body)["headers"])["x-tag"] == ["a", "b", "c"]


async def test_upstream_sees_no_header_the_client_did_not_send(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory
) -> None:
    client = await sidecar(policy, await serve(aiohttp_server, answering(headers_seen)))
    _, body = await raw_exchange(
        client.port,
        "POST /files/me HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n"
        f"X-API-Key: {ACME}\r\nContent-Length: 5\r\n\r\nhello",
    )
    seen = set(lower_headers(json.loads(body)["headers"]))
    forwarding = {"x-forwarded-for", "x-forwarded-proto", "via", "x-customer-id", "x-customer-plan"}
    assert seen - forwarding - {"connection"} == {"host", "content-length"}  # the key is not passed on


async def test_hop_by_hop_request_headers_are_dropped_end_to_end_kept(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory
) -> None:
    client = await sidecar(policy, await serve(aiohttp_server, answering(headers_seen)))
    response = await client.get(
        "/files/hop",
        headers={
            "X-API-Key": ACME,
            "Connection": "keep-alive, X-Foo",
            "X-Foo": "hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "Proxy-Connection": "keep-alive",
            "X-Bar": "end-to-end",
        },
    )
    seen = lower_headers((await response.json())["headers"])
    dropped = {"x-foo", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection"}
    assert dropped.isdisjoint(seen)
    assert seen.get("connection", ["keep-alive"]) == ["keep-alive"]  # only the upstream hop's own
    assert seen["x-bar"] == ["end-to-end"]


async def test_hop_by_hop_response_headers_are_dropped(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory
) -> None:
    async def hop_headers(request: web.Request) -> web.Response:
        headers = {
            "Connection": "X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "X-Visible": "1",
        }
        return web.Response(text="ok", headers=headers)

    client = await sidecar(policy, await serve(aiohttp_server, answering(hop_headers)))
    response = await client.get("/files/hop", headers={"X-API-Key": ACME})
    assert "X-Secret-Hop" not in response.headers
    assert "Keep-Alive" not in response.headers
    assert "X-Secret-Hop" not in response.headers.get("Connection", "")
    assert response.headers["X-Visible"] == "1"


@pytest.mark.parametrize(
    ("sent", "forwarded_for", "forwarded_proto"),
    [
        ([], "127.0.0.1", "http"),
        (
            [("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "https")],
            "1.2.3.4, 127.0.0.1",
            "https, http",
        ),
        (
            [("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-For", "5.6.7.8, 9.9.9.9")],
            "1.2.3.4, 5.6.7.8, 9.9.9.9, 127.0.0.1",
            "http",
        ),
    ],
    ids=["absent", "appended", "repeated"],
)
async def test_x_forwarded_headers_are_appended_to(
    sidecar: SidecarFactory,
    policy: Path,
    aiohttp_server: ServerFactory,
    sent: list[tuple[str, str]],
    forwarded_for: str,
    forwarded_proto: str,
) -> None:
    client = await sidecar(policy, await serve(aiohttp_server, answering(headers_seen)))
    response = await client.get("/files/xff", headers=[("X-API-Key", ACME), *sent])
    seen = lower_headers((await response.json())["headers"])
    assert seen["x-forwarded-for"] == [forwarded_for]
    assert seen["x-forwarded-proto"] == [forwarded_proto]


async def test_upstream_cookies_are_not_shared_between_customers(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory
) -> None:
    cookies_seen: list[str | None] = []

    async def sets_a_cookie(request: web.Request) -> web.Response:
        cookies_seen.append(request.headers.get("Cookie"))
        response = web.Response(text="ok")
        response.set_cookie("session", "acme-secret", path="/")
        return response

    client = await sidecar(policy, await serve(aiohttp_server, answering(sets_a_cookie)))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        first = await session.get(client.make_url("/files/a"), headers={"X-API-Key": ACME})
        second = await session.get(client.make_url("/files/a"), headers={"X-API-Key": BOB})
        await first.read(), await second.read()
    assert "session=acme-secret" in first.headers["Set-Cookie"]
    assert cookies_seen == [None, None]


# --- upstream failures ------------------------------------------------------------------------


async def test_upstream_down_is_502_problem_counted_as_refused(sidecar: SidecarFactory, policy: Path) -> None:
    client = await sidecar(policy, f"http://127.0.0.1:{free_port()}")
    response = await client.get("/files/x", headers={"X-API-Key": ACME})
    body = await response.json(content_type="application/problem+json")
    assert (response.status, body["status"], body["title"]) == (502, 502, "Bad Gateway")
    assert upstream_errors(client, "refused") == 1


async def test_slow_upstream_is_504_within_the_upstream_timeout(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="too late")

    client = await sidecar(policy, await serve(aiohttp_server, answering(slow)), upstream_timeout=0.3)
    started = time.perf_counter()
    response = await client.get("/files/slow", headers={"X-API-Key": ACME})
    elapsed = time.perf_counter() - started
    body = await response.json(content_type="application/problem+json")
    assert (response.status, body["status"]) == (504, 504)
    assert 0.3 <= elapsed < 1.0
    assert upstream_errors(client, "timeout") == 1


async def test_upstream_dying_mid_body_cuts_the_client_connection(
    sidecar: SidecarFactory, policy: Path, aiohttp_server: ServerFactory
) -> None:
    async def dies(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000000"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.close()
        return response

    client = await sidecar(policy, await serve(aiohttp_server, answering(dies)))
    async with client.get("/files/broken", headers={"X-API-Key": ACME}) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert upstream_errors(client, "broken") == 1


# --- the client going away is not an upstream failure -----------------------------------------


@dataclass
class Served:
    port: int
    components: Components
    handled: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def served_like_sidecar_run(
    policy: Path, upstream_url: str, redis_url: str, **settings: object
) -> AsyncIterator[Served]:
    """A sidecar served the way `sidecar run` serves it (server._site).

    Unlike aiohttp's TestServer, that server does not cancel a handler whose client disconnects,
    so the handler itself meets the dead connection. `handled` is set once the handler returns.
    """
    components = make_components(policy, upstream_url, redis_url, **settings)
    app = build_proxy_app(components)
    served = Served(port=0, components=components)

    @web.middleware
    async def mark_handled(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            served.handled.set()

    app.middlewares.append(mark_handled)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        served.port = runner.addresses[0][1]
        yield served
    finally:
        await runner.cleanup()
        await components.store.close()


async def test_client_leaving_mid_response_stops_the_upstream_and_is_not_an_upstream_error(
    policy: Path, aiohttp_server: ServerFactory, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    upstream_stopped = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(PATTERN)
        except ConnectionError:
            return response  # the sidecar hung up on us, as it should
        finally:
            upstream_stopped.set()  # also when cancelled: TestServer cancels handlers of lost clients

    async with served_like_sidecar_run(
        policy, await serve(aiohttp_server, answering(endless)), redis_url
    ) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(f"GET /files/endless HTTP/1.1\r\nHost: sidecar\r\nX-API-Key: {ACME}\r\n\r\n".encode())
        await asyncio.wait_for(reader.readexactly(4 * MB), 5)
        writer.transport.abort()
        await asyncio.wait_for(asyncio.gather(served.handled.wait(), upstream_stopped.wait()), 5)
        assert errors_of(served.components.metrics, "broken") == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_client_leaving_mid_upload_is_not_an_upstream_error(
    policy: Path, aiohttp_server: ServerFactory, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    upstream_received = asyncio.Event()

    async def slurp(request: web.Request) -> web.Response:
        upstream_received.set()
        await request.read()
        return web.Response(text="read it all")

    async with served_like_sidecar_run(
        policy, await serve(aiohttp_server, answering(slurp)), redis_url
    ) as served:
        _, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(
            f"PUT /files/up HTTP/1.1\r\nHost: sidecar\r\nX-API-Key: {ACME}\r\n"
            f"Content-Length: {10 * MB}\r\n\r\n".encode()
        )
        writer.write(PATTERN)
        await asyncio.wait_for(upstream_received.wait(), 5)
        writer.transport.abort()
        await asyncio.wait_for(served.handled.wait(), 5)
        assert errors_of(served.components.metrics, "refused") == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
