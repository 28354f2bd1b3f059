"""The upstream client (sidecar/http/upstream.py) against real servers on 127.0.0.1: aiohttp apps
for what a well-behaved upstream does, and raw asyncio servers for the bytes aiohttp would never
send (interim answers, a body read until the close, a connection closed under a request)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.errors import BodyTooLarge, StaleConnection, UploadFailed, UpstreamFailed
from sidecar.http.upstream import Answer, Outbound, UpstreamPool
from sidecar.store.redis.embedded import free_port
from tests.helpers import ServerFactory, answering, serve

TIMEOUT = 5.0
MB = 1024 * 1024
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., UpstreamPool]]:
    """UpstreamPool(url, timeout=TIMEOUT, limit=10, ...), every one closed at the end."""
    made: list[UpstreamPool] = []

    def make(url: str, *, timeout: float = TIMEOUT, limit: int = 10, **options: object) -> UpstreamPool:
        made.append(UpstreamPool(url, timeout, limit, **options))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for pool in made:
        await pool.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    """A raw upstream that runs ``script`` on every connection, then closes it; its base URL."""
    servers: list[asyncio.Server] = []
    scripts: list[asyncio.Task[None]] = []

    async def run(script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection: what some tests do on purpose
        finally:
            writer.close()

    async def start(script: Script) -> str:
        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            scripts.append(asyncio.ensure_future(run(script, reader, writer)))

        server = await asyncio.start_server(connected, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()
    for task in scripts:
        task.cancel()
    await asyncio.gather(*scripts, return_exceptions=True)


def get(target: str = "/", method: str = "GET", body: bytes | AsyncIterator[bytes] | None = None) -> Outbound:
    return Outbound(method, target, CIMultiDict({"Host": "sidecar"}), body)


async def whole(answer: Answer) -> bytes:
    """The answer's body, read to its end in 64 KiB reads; the answer released."""
    parts = []
    try:
        while part := await answer.read(64 * 1024):
            parts.append(part)
    finally:
        answer.release()
    return b"".join(parts)


async def request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def peer_port(request: web.Request) -> web.Response:
    assert request.transport is not None
    return web.Response(text=str(request.transport.get_extra_info("peername")[1]))


# --- keep-alive -----------------------------------------------------------------------------------


async def test_a_connection_is_kept_alive_and_reused(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool]
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return peer_port(request)

    pool = pools(await serve(aiohttp_server, answering(handler)))
    ports = {await whole(await pool.send(get())) for _ in range(3)}
    assert len(ports) == 1
    assert (pool.connections, pool.idle) == (1, 1)


async def test_idle_connections_are_reused_last_in_first_out(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool]
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return peer_port(request)

    pool = pools(await serve(aiohttp_server, answering(handler)))
    first, second = await asyncio.gather(pool.send(get()), pool.send(get()))
    first_port, second_port = await whole(first), await whole(second)  # second goes back last
    assert await whole(await pool.send(get())) == second_port != first_port


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool]
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return peer_port(request)

    server = await aiohttp_server(answering(handler), host="127.0.0.1", keepalive_timeout=0.1)
    pool = pools(str(server.make_url("")).rstrip("/"))
    before = await whole(await pool.send(get()))
    await asyncio.sleep(0.4)  # the upstream's keep-alive timeout closes it
    after = await whole(await pool.send(get()))
    assert before != after
    assert pool.connections == 1


async def test_connection_close_from_the_upstream_ends_the_connection(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool]
) -> None:
    async def handler(request: web.Request) -> web.Response:
        response = peer_port(request)
        response.force_close()
        return response

    pool = pools(await serve(aiohttp_server, answering(handler)))
    answer = await pool.send(get())
    assert answer.headers["Connection"] == "close"
    first = await whole(answer)
    assert pool.idle == 0
    assert await whole(await pool.send(get())) != first


async def test_a_request_on_a_kept_connection_closed_under_it_is_sent_again_when_safe(
    raw: Callable[[Script], Awaitable[str]], pools: Callable[..., UpstreamPool]
) -> None:
    """The upstream answers the first request of each connection and closes on the second
    without a byte: the race between a request and an idle close, made certain."""
    seen: list[bytes] = []

    async def once_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await request_head(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    pool = pools(await raw(once_per_connection))
    assert await whole(await pool.send(get())) == b"ok"
    assert await whole(await pool.send(get())) == b"ok"  # sent again on a new connection
    assert len(seen) == 2
    with pytest.raises(StaleConnection):  # POST is not idempotent: never sent twice
        await pool.send(get(method="POST", body=b"x"))


# --- framing --------------------------------------------------------------------------------------


async def test_a_chunked_answer_is_read_whole(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool]
) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"one ", b"two ", b"three"):
            await response.write(part)
        await response.write_eof()
        return response

    pool = pools(await serve(aiohttp_server, answering(chunked)))
    answer = await pool.send(get())
    assert "Transfer-Encoding" in answer.headers
    assert await whole(answer) == b"one two three"
    assert pool.idle == 1


async def test_head_204_and_304_answers_have_no_body_and_keep_the_connection(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool]
) -> None:
    async def bodiless(request: web.Request) -> web.Response:
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": "100"})
        return web.Response(status=int(request.path[1:]))

    pool = pools(await serve(aiohttp_server, answering(bodiless)))
    for outbound, status in ((get(method="HEAD"), 200), (get("/204"), 204), (get("/304"), 304)):
        answer = await pool.send(outbound)
        assert answer.status == status
        assert answer.whole(0) == b""
        answer.release()
    assert answer.status == 304
    assert (pool.connections, pool.idle) == (1, 1)


async def test_interim_answers_are_skipped(
    raw: Callable[[Script], Awaitable[str]], pools: Callable[..., UpstreamPool]
) -> None:
    async def interim(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
        await writer.drain()
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nTrailer: x\r\n\r\ndone")
        await reader.read()

    pool = pools(await raw(interim))
    answer = await pool.send(get())
    assert (answer.status, answer.reason, answer.whole(100)) == (201, "Created", b"done")
    assert "Link" not in answer.headers


async def test_a_body_read_until_the_close_is_whole_and_the_connection_not_reused(
    raw: Callable[[Script], Awaitable[str]], pools: Callable[..., UpstreamPool]
) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100_000)
        await writer.drain()
        writer.close()

    pool = pools(await raw(until_close))
    assert await whole(await pool.send(get())) == b"x" * 100_000
    assert pool.idle == 0


async def test_chunked_trailers_are_dropped(
    raw: Callable[[Script], Awaitable[str]], pools: Callable[..., UpstreamPool]
) -> None:
    async def trailers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Sum: 1\r\n\r\n")
        await reader.read()

    pool = pools(await raw(trailers))
    answer = await pool.send(get())
    assert await whole(answer) == b"ok"
    assert "X-Sum" not in answer.headers
    assert pool.idle == 1


async def test_the_request_head_names_the_host_the_prefix_and_the_framing(
    raw: Callable[[Script], Awaitable[str]], pools: Callable[..., UpstreamPool]
) -> None:
    heads: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            heads.append(await request_head(reader))
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    url = await raw(record)
    pool = pools(f"{url}/api")
    for outbound in (
        Outbound("GET", "/a%2Fb?q=%7E", CIMultiDict()),
        Outbound("POST", "/p", CIMultiDict({"Host": "client.example"})),
    ):
        (await pool.send(outbound)).release()
    port = url.rsplit(":", 1)[1]
    assert heads == [
        f"GET /api/a%2Fb?q=%7E HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(),
        b"POST /api/p HTTP/1.1\r\nHost: client.example\r\nContent-Length: 0\r\n\r\n",
    ]


# --- bodies both ways -----------------------------------------------------------------------------


async def parts(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, total, size):
        await asyncio.sleep(0)
        yield b"u" * min(size, total - start)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_large_body_streams_both_ways(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool], declared: bool
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        async for part in request.content.iter_chunked(64 * 1024):
            await response.write(part)
        await response.write_eof()
        return response

    pool = pools(await serve(aiohttp_server, answering(echo)))
    headers = CIMultiDict({"Content-Length": str(8 * MB)} if declared else {})
    answer = await pool.send(Outbound("PUT", "/", headers, parts(8 * MB)))
    assert answer.whole(64 * 1024) is None
    assert await whole(answer) == b"u" * 8 * MB
    assert pool.idle == 1


async def test_a_body_in_memory_goes_out_with_the_head(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool]
) -> None:
    async def length(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.headers.get('Transfer-Encoding')} {len(await request.read())}")

    pool = pools(await serve(aiohttp_server, answering(length)))
    declared = Outbound("POST", "/", CIMultiDict({"Content-Length": "5"}), b"hello")
    assert await whole(await pool.send(declared)) == b"None 5"
    assert await whole(await pool.send(get(method="POST", body=b"hello"))) == b"chunked 5"
    assert await whole(await pool.send(get(method="POST", body=b""))) == b"chunked 0"


async def test_a_failing_request_body_fails_the_request_with_its_cause(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool]
) -> None:
    async def read_all(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    async def too_large() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise BodyTooLarge(1000)

    pool = pools(await serve(aiohttp_server, answering(read_all)))
    with pytest.raises(UploadFailed) as failed:
        await pool.send(get(method="POST", body=too_large()))
    assert isinstance(failed.value.__cause__, BodyTooLarge)
    assert await whole(await pool.send(get())) == b"0"  # the next request gets a fresh connection


# --- failures -------------------------------------------------------------------------------------


async def test_an_upstream_that_dies_mid_body_breaks_the_read(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool]
) -> None:
    async def dies(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(MB)})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.close()
        return response

    pool = pools(await serve(aiohttp_server, answering(dies)))
    with pytest.raises(UpstreamFailed):
        await whole(await pool.send(get()))
    assert pool.connections == 0


async def test_an_unreachable_upstream_fails_at_once(pools: Callable[..., UpstreamPool]) -> None:
    pool = pools(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamFailed) as failed:
        await pool.send(get())
    assert isinstance(failed.value.__cause__, ConnectionRefusedError)
    assert pool.connections == 0


async def test_an_upstream_slower_than_the_timeout_times_out(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool]
) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        if request.path == "/head":
            await asyncio.sleep(1)
        response = web.StreamResponse(headers={"Content-Length": "10"})
        await response.prepare(request)
        await response.write(b"12345")
        await asyncio.sleep(1)
        return response

    pool = pools(await serve(aiohttp_server, answering(slow)), timeout=0.2)
    with pytest.raises(TimeoutError):
        await pool.send(get("/head"))
    answer = await pool.send(get("/body"))
    with pytest.raises(TimeoutError):
        await whole(answer)
    assert pool.connections == 0


async def test_a_slow_reader_is_not_the_upstream_timing_out(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool]
) -> None:
    async def large(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 4 * MB)

    pool = pools(await serve(aiohttp_server, answering(large)), timeout=0.2)
    answer = await pool.send(get())
    await asyncio.sleep(0.5)  # flow control has paused reading: the upstream waits on us
    assert len(await whole(answer)) == 4 * MB


# --- the pool -------------------------------------------------------------------------------------


async def test_the_pool_opens_no_more_connections_than_its_limit(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool]
) -> None:
    busy, most = 0, 0

    async def counting(request: web.Request) -> web.Response:
        nonlocal busy, most
        busy += 1
        most = max(most, busy)
        await asyncio.sleep(0.05)
        busy -= 1
        return peer_port(request)

    pool = pools(await serve(aiohttp_server, answering(counting)), limit=2)
    answers = await asyncio.wait_for(asyncio.gather(*(exchange(pool) for _ in range(8))), TIMEOUT)
    assert most == 2
    assert len(set(answers)) == 2
    assert pool.connections == 2


async def exchange(pool: UpstreamPool) -> bytes:
    return await whole(await pool.send(get()))


async def test_close_closes_every_connection(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool]
) -> None:
    release = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        if request.path == "/held":
            await release.wait()
        return web.Response(text="ok")

    server = await aiohttp_server(answering(held), host="127.0.0.1")
    pool = pools(str(server.make_url("")).rstrip("/"))
    await exchange(pool)
    waiting = [asyncio.ensure_future(pool.send(get("/held"))) for _ in range(2)]
    await asyncio.sleep(0.1)
    assert (pool.connections, pool.idle) == (2, 0)
    await pool.close()
    for request in waiting:
        with pytest.raises(UpstreamFailed):
            await request
    assert pool.connections == 0
    release.set()
    async with asyncio.timeout(TIMEOUT):
        while server.runner.server.connections:  # type: ignore[union-attr]
            await asyncio.sleep(0.01)


# --- TLS ------------------------------------------------------------------------------------------


async def test_an_https_upstream_is_reached_over_tls(
    aiohttp_server: ServerFactory, pools: Callable[..., UpstreamPool], tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=request.scheme)

    server = await aiohttp_server(answering(hello), host="127.0.0.1", ssl=served)
    pool = pools(f"https://127.0.0.1:{server.port}", tls=trusting)
    assert await exchange(pool) == b"https"
    assert await exchange(pool) == b"https"
    assert pool.connections == 1
    with pytest.raises(UpstreamFailed):  # the system's roots do not trust it
        await exchange(pools(f"https://127.0.0.1:{server.port}"))
