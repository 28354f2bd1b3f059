"""The baseline: a bare aiohttp reverse proxy with no metering, in its own process.

It does what any correct reverse proxy does and nothing more: forward method, path, query and
headers (hop-by-hop headers dropped, X-Forwarded-For/-Proto appended), stream both bodies in
64 KiB chunks. Its server and its upstream ClientSession are configured exactly as the sidecar's
(sidecar/http/app.py and sidecar/runtime/server.py): the same connector limit, timeouts, no cookie jar, no
decompression, no environment proxies, the same max_field_size, no access log. So the gap between
the two is what metering costs: routing, identity, the Redis round trip, metrics and the
RateLimit headers.

    python -m bench.bare_proxy --listen 127.0.0.1:PORT --upstream http://127.0.0.1:PORT [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.http.app import upstream_client
from sidecar.http.headers import HOP_BY_HOP, connection_listed
from sidecar.http.proxy import CHUNK_SIZE

# Headers aiohttp's client would otherwise invent: the upstream sees only what the client sent
# (the sidecar's own upstream client, http/upstream.py, invents none).
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

UPSTREAM_TIMEOUT = 30.0  # the sidecar's --upstream-timeout default
FORWARDING = frozenset({"x-forwarded-for", "x-forwarded-proto"})

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def _dropped(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    return HOP_BY_HOP | connection_listed(headers)


def _appended(headers: CIMultiDictProxy[str], name: str, value: str) -> str:
    previous = ", ".join(headers.getall(name, ()))
    return f"{previous}, {value}" if previous else value


async def handle(request: web.Request) -> web.StreamResponse:
    url = URL(request.app[UPSTREAM] + request.rel_url.raw_path_qs, encoded=True)
    dropped = _dropped(request.headers) | FORWARDING
    headers = CIMultiDict((n, v) for n, v in request.headers.items() if n.lower() not in dropped)
    headers["X-Forwarded-For"] = _appended(request.headers, "X-Forwarded-For", request.remote or "unknown")
    headers["X-Forwarded-Proto"] = _appended(request.headers, "X-Forwarded-Proto", request.scheme)
    body = request.content.iter_chunked(CHUNK_SIZE) if request.body_exists else None
    try:
        upstream = await request.app[SESSION].request(
            request.method,
            url,
            headers=headers,
            data=body,
            allow_redirects=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
        )
    except TimeoutError:
        return web.Response(status=504, text="upstream timeout")
    except aiohttp.ClientError as error:
        return web.Response(status=502, text=f"upstream unreachable ({type(error).__name__})")
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        dropped = _dropped(upstream.headers)
        response.headers.extend((n, v) for n, v in upstream.headers.items() if n.lower() not in dropped)
        await response.prepare(request)
        while True:
            try:
                chunk = await upstream.content.read(CHUNK_SIZE)
            except (aiohttp.ClientError, TimeoutError):
                if request.transport is not None:
                    request.transport.abort()  # never pass a short body off as complete
                return response
            try:
                if not chunk:
                    await response.write_eof()
                    return response
                await response.write(chunk)
            except ConnectionError:
                return response


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    session = upstream_client(UPSTREAM_TIMEOUT)  # the sidecar's own session settings
    app[SESSION] = session
    yield
    await session.close()


def build_app(upstream: str) -> web.Application:
    app = web.Application(handler_args={"max_field_size": 16384})  # as sidecar/http/app.py
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_upstream_session)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    runner = web.AppRunner(build_app(upstream), access_log=None, shutdown_timeout=5, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        await stopping.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_proxy")
    parser.add_argument("--listen", required=True, help="HOST:PORT (loopback)")
    parser.add_argument("--upstream", required=True, help="upstream base URL")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (to measure what it gives)")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(host, int(port), args.upstream))


if __name__ == "__main__":
    main()
