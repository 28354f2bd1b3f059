"""The two aiohttp applications: the proxy port and the admin port, built from one Components."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from sidecar import tasks
from sidecar.errors import StoreUnavailable
from sidecar.http import admin, history_api, intake, proxy, selfservice
from sidecar.http.components import COMPONENTS, SESSION, UPSTREAM, Components
from sidecar.http.upstream import UpstreamPool

# Upstream connections kept open for reuse; a sidecar talks to one upstream.
UPSTREAM_CONNECTIONS = 1000


def build_proxy_app(components: Components) -> web.Application:
    app = web.Application(
        middlewares=[intake.screen_requests], handler_args=intake.handler_args(components.settings)
    )
    app[COMPONENTS] = components
    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_stored_customers)
    app.router.add_get(selfservice.PATH, selfservice.own_usage)
    app.router.add_get(history_api.SELF_PATH, history_api.own_history)
    # 100 Continue only once admitted: aiohttp's default Expect handler would send it before admission.
    app.router.add_route("*", "/{tail:.*}", proxy.handle, expect_handler=intake.expect_after_admission)
    return app


def build_admin_app(components: Components) -> web.Application:
    app = web.Application(middlewares=[admin.require_token])
    app[COMPONENTS] = components
    admin.add_routes(app)
    return app


async def _stored_customers(app: web.Application) -> AsyncIterator[None]:
    """Keep the stored customers fresh (one GET a second) while the proxy serves."""
    directory = app[COMPONENTS].directory
    with contextlib.suppress(StoreUnavailable):
        await directory.refresh()
    task = asyncio.create_task(directory.watch())
    yield
    await tasks.stop(task)


def upstream_client(timeout: float) -> aiohttp.ClientSession:
    """A keep-alive session to the upstream: no cookies kept, no decompression, no env proxies.
    The sidecar relays WebSocket upgrades with it (requests go over UpstreamPool); the benchmark's
    bare proxy forwards every request with it, as any aiohttp proxy would."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=UPSTREAM_CONNECTIONS),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
    )


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    """The upstream pool and the WebSocket session, both closed with the app, connections and all."""
    settings = app[COMPONENTS].settings
    pool = UpstreamPool(settings.upstream, settings.upstream_timeout, UPSTREAM_CONNECTIONS)
    session = upstream_client(settings.upstream_timeout)  # opens no connection until a WebSocket asks
    app[UPSTREAM] = pool
    app[SESSION] = session
    yield
    await pool.close()
    await session.close()
