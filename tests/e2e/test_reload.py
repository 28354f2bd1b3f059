"""POST /admin/reload: 200 when the new policy is in force, 422 with located errors when refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.http.app import build_admin_app, build_proxy_app
from sidecar.http.components import COMPONENTS
from tests.conftest import make_components
from tests.helpers import Client, ClientFactory, Upstream, key_hash, loopback_client, write_policy

KEY = "acme-key-1"


def policy_text(limit: str) -> str:
    return f"""
        version: 1
        meters: {{requests: {{aggregation: count}}}}
        features: [{{name: search, match: {{path: /v1/search}}}}]
        plans: {{p: {{features: [search], limits: [{{{limit}, period: day}}]}}}}
        customers: {{acme: {{plan: p, api_keys: ["{key_hash(KEY)}"]}}}}
        """


@pytest.fixture
async def pair(
    aiohttp_client: ClientFactory, redis_url: str, upstream: Upstream, tmp_path: Path
) -> tuple[Client, Client, Path]:
    """A proxy and an admin app sharing one set of components, as `sidecar run` builds them."""
    path = write_policy(tmp_path, policy_text("meter: requests, limit: 1"))
    components = make_components(path, upstream.url, redis_url)
    proxy = await loopback_client(aiohttp_client, build_proxy_app(components))
    admin = await loopback_client(aiohttp_client, build_admin_app(components), closing=components.store)
    return proxy, admin, path


async def search_status(proxy: Client) -> int:
    response = await proxy.get("/v1/search", headers={"X-API-Key": KEY})
    await response.read()
    return response.status


async def test_reload_puts_the_edited_policy_in_force(pair: tuple[Client, Client, Path]) -> None:
    proxy, admin, path = pair
    assert [await search_status(proxy) for _ in range(2)] == [200, 429]
    write_policy(path.parent, policy_text("meter: requests, limit: 3"))
    response = await admin.post("/admin/reload")
    assert response.status == 200
    assert (await response.json())["status"] == "applied"
    assert [await search_status(proxy) for _ in range(3)] == [200, 200, 429]
    registry = admin.app[COMPONENTS].metrics.registry
    assert registry.get_sample_value("sidecar_policy_reloads_total", {"outcome": "applied"}) == 1


async def test_refused_reload_answers_422_with_located_errors_and_old_limits_hold(
    pair: tuple[Client, Client, Path],
) -> None:
    proxy, admin, path = pair
    write_policy(path.parent, policy_text("meter: requests, limt: 3"))
    response = await admin.post("/admin/reload")
    body = await response.json(content_type="application/problem+json")
    assert response.status == 422
    assert body["errors"] == [
        f"{path}:5:42: plans.p.limits[0]: missing required key 'limit'",
        f"{path}:5:60: plans.p.limits[0].limt: unknown key 'limt'; did you mean 'limit'?",
    ]
    assert [await search_status(proxy) for _ in range(2)] == [200, 429]
    registry = admin.app[COMPONENTS].metrics.registry
    assert registry.get_sample_value("sidecar_policy_reloads_total", {"outcome": "refused"}) == 1
