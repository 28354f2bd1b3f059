"""PUT /admin/customers/{id}: customers stored in Redis, served by every replica within a second."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.config.policy.holder import PolicyHolder
from sidecar.http.app import build_admin_app, build_proxy_app
from sidecar.http.components import open_components
from tests.conftest import Upstream, key_hash, settings_for, write_policy

Client = TestClient[web.Request, web.Application]
NEW_KEY = "carol-key-1"


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters: {{requests: {{aggregation: count}}}}
        features:
          - {{name: search, match: {{path: /v1/search}}}}
          - {{name: export, match: {{path: /v1/export}}}}
        plans:
          free: {{features: [search], limits: [{{meter: requests, limit: 2, period: day}}]}}
          pro: {{features: [search, export]}}
        customers:
          acme: {{plan: free, api_keys: ["{key_hash("acme-key-1")}"]}}
        """,
    )


@pytest.fixture
def replica(
    aiohttp_client: Callable[..., Awaitable[Client]], redis_url: str, upstream: Upstream, policy: Path
) -> Callable[[], Awaitable[tuple[Client, Client]]]:
    """One replica: a proxy and an admin app sharing components, as `sidecar run` builds them."""

    async def make() -> tuple[Client, Client]:
        opened = AsyncExitStack()
        components = await opened.enter_async_context(
            open_components(settings_for(upstream.url), PolicyHolder.load(policy), redis_url)
        )
        proxy = await aiohttp_client(build_proxy_app(components), server_kwargs={"host": "127.0.0.1"})
        admin_app = build_admin_app(components)
        admin_app.on_cleanup.append(lambda _: opened.aclose())
        admin = await aiohttp_client(admin_app, server_kwargs={"host": "127.0.0.1"})
        return proxy, admin

    return make


async def status(proxy: Client, path: str, key: str) -> int:
    response = await proxy.get(path, headers={"X-API-Key": key})
    await response.read()
    return response.status


async def test_a_stored_customer_is_served_here_at_once_and_by_another_replica_within_a_second(
    replica: Callable[[], Awaitable[tuple[Client, Client]]],
) -> None:
    (proxy_a, admin_a), (proxy_b, _) = await replica(), await replica()
    assert await status(proxy_b, "/v1/export", NEW_KEY) == 401
    body = {"plan": "pro", "api_keys": [key_hash(NEW_KEY)], "billing_anchor": "2026-01-31"}
    response = await admin_a.put("/admin/customers/carol", json=body)
    assert (response.status, (await response.json())["plan"]) == (200, "pro")
    assert await status(proxy_a, "/v1/export", NEW_KEY) == 200
    started = asyncio.get_running_loop().time()
    while await status(proxy_b, "/v1/export", NEW_KEY) != 200:
        assert asyncio.get_running_loop().time() - started < 2.0, "replica B never saw the new customer"
        await asyncio.sleep(0.05)


async def test_a_stored_entry_overrides_the_file_customer_plan_and_keys(
    replica: Callable[[], Awaitable[tuple[Client, Client]]],
) -> None:
    proxy, admin = await replica()
    assert await status(proxy, "/v1/export", "acme-key-1") == 403
    body = {"plan": "pro", "api_keys": [key_hash("acme-key-2")]}
    assert (await admin.put("/admin/customers/acme", json=body)).status == 200
    assert await status(proxy, "/v1/export", "acme-key-2") == 200
    assert await status(proxy, "/v1/export", "acme-key-1") == 401
    usage = await (await admin.get("/admin/customers/acme/usage")).json()
    assert usage["plan"] == "pro"


async def test_an_invalid_customer_is_refused_with_every_problem_and_no_key_echoed(
    replica: Callable[[], Awaitable[tuple[Client, Client]]],
) -> None:
    _, admin = await replica()
    body = {"plan": "gold", "api_keys": ["my-clear-secret"], "billing_anchor": "2026-02-30", "colour": "red"}
    response = await admin.put("/admin/customers/carol", json=body)
    problem = await response.json(content_type="application/problem+json")
    assert response.status == 422
    assert problem["errors"] == [
        "unknown field 'colour'",
        "plan must be one of free, pro",
        "api_keys[0] is not a sha256: hash (the value is not shown); use `sidecar hash-key`",
        "billing_anchor '2026-02-30' is not a date YYYY-MM-DD",
    ]
    assert "my-clear-secret" not in await response.text()


async def test_a_key_that_belongs_to_another_customer_is_refused(
    replica: Callable[[], Awaitable[tuple[Client, Client]]],
) -> None:
    _, admin = await replica()
    response = await admin.put(
        "/admin/customers/carol", json={"plan": "pro", "api_keys": [key_hash("acme-key-1")]}
    )
    problem = await response.json(content_type="application/problem+json")
    assert (response.status, problem["errors"]) == (422, ["api_keys[0] already belongs to customer 'acme'"])


async def test_stored_customers_survive_a_restart_of_the_sidecar(
    replica: Callable[[], Awaitable[tuple[Client, Client]]],
) -> None:
    _, admin = await replica()
    assert (
        await admin.put("/admin/customers/carol", json={"plan": "pro", "api_keys": [key_hash(NEW_KEY)]})
    ).status == 200
    fresh_proxy, _ = await replica()
    assert await status(fresh_proxy, "/v1/export", NEW_KEY) == 200
