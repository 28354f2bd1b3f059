"""The admin port (SPEC §7): health, readiness, metrics, the usage document and bearer auth,
through real admin and proxy apps, a real upstream and real Redis."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.windows import Period, calendar_window, rfc3339
from sidecar.http.app import build_admin_app, build_proxy_app
from sidecar.store.redis.embedded import free_port
from tests.conftest import SidecarFactory, make_components
from tests.helpers import ClientFactory, Upstream, key_hash, loopback_client, write_policy

ACME, BOB = "acme-key-1", "bob-key-1"
ANCHOR = date(2026, 1, 15)


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters:
          requests: {{aggregation: count}}
          tokens: {{aggregation: sum, source: "response.header:X-Usage-Tokens"}}
        features:
          - {{name: search, match: {{method: GET, path: /v1/search}}}}
          - {{name: export, match: {{method: POST, path: "/v1/exports/{{id}}"}}, cost: {{requests: 10}}}}
        plans:
          free:
            features: [search]
            limits:
              - {{meter: requests, limit: 5, period: month}}
          pro:
            features: [search, export]
            limits:
              - {{meter: requests, limit: 100, period: month}}
              - {{meter: requests, limit: 50, period: minute}}
              - {{meter: requests, limit: 30, period: day, feature: export}}
              - {{meter: tokens, limit: 1000, period: month, on_exceed: allow}}
        customers:
          acme: {{plan: pro, api_keys: ["{key_hash(ACME)}"], billing_anchor: "{ANCHOR.isoformat()}"}}
          bob: {{plan: free, api_keys: ["{key_hash(BOB)}"]}}
        """,
    )


def parse_rfc3339(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


async def traffic(proxy: TestClient[web.Request, web.Application], method: str, path: str, key: str) -> int:
    response = await proxy.request(method, path, headers={"X-API-Key": key})
    await response.read()
    return response.status


# -- health and readiness ------------------------------------------------------------------------


async def test_healthz_is_200(sidecar: SidecarFactory, policy: Path, upstream: Upstream) -> None:
    admin = await sidecar(policy, upstream.url, admin=True)
    response = await admin.get("/healthz")
    assert (response.status, await response.json()) == (200, {"status": "ok"})


async def test_readyz_is_200_with_the_policy_summary(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    admin = await sidecar(policy, upstream.url, admin=True)
    response = await admin.get("/readyz")
    body = await response.json()
    assert (response.status, body["status"]) == (200, "ready")
    assert body["policy"] == load_policy(policy).summary()
    assert "2 plans, 2 customers" in body["policy"]


async def test_readyz_is_503_when_the_store_is_unreachable(
    aiohttp_client: ClientFactory, policy: Path, upstream: Upstream
) -> None:
    components = make_components(policy, upstream.url, f"redis://127.0.0.1:{free_port()}/0")
    admin = await loopback_client(aiohttp_client, build_admin_app(components), closing=components.store)
    started = time.monotonic()
    response = await admin.get("/readyz")
    assert (response.status, (await response.json())["status"]) == (503, "unavailable")
    assert (await admin.get("/healthz")).status == 200
    assert time.monotonic() - started < 5


async def test_usage_while_the_store_is_unreachable_is_503_problem(
    aiohttp_client: ClientFactory, policy: Path, upstream: Upstream
) -> None:
    components = make_components(policy, upstream.url, f"redis://127.0.0.1:{free_port()}/0")
    admin = await loopback_client(aiohttp_client, build_admin_app(components), closing=components.store)
    response = await admin.get("/admin/customers/acme/usage")
    body = await response.json(content_type="application/problem+json")
    assert (response.status, body["status"]) == (503, 503)
    assert int(response.headers["Retry-After"]) >= 1


# -- metrics -------------------------------------------------------------------------------------


async def test_metrics_count_requests_by_decision_feature_and_plan(
    aiohttp_client: ClientFactory, policy: Path, upstream: Upstream, redis_url: str
) -> None:
    components = make_components(policy, upstream.url, redis_url)
    proxy = await loopback_client(aiohttp_client, build_proxy_app(components))
    admin = await loopback_client(aiohttp_client, build_admin_app(components), closing=components.store)
    assert [await traffic(proxy, "GET", "/v1/search", ACME) for _ in range(2)] == [200, 200]
    assert await traffic(proxy, "GET", "/v1/search", "not-a-key") == 401

    response = await admin.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    samples = [
        sample
        for family in text_string_to_metric_families(await response.text())
        for sample in family.samples
        if sample.name == "sidecar_requests_total"
    ]
    admitted = {
        (s.labels["feature"], s.labels["plan"]): s.value
        for s in samples
        if s.labels["decision"] == "admitted"
    }
    assert admitted == {("search", "pro"): 2.0}
    assert sum(s.value for s in samples if s.labels["decision"] == "unauthorized") == 1.0
    assert all("acme" not in s.labels.values() for s in samples)


# -- the usage document --------------------------------------------------------------------------


async def test_usage_document_shows_used_remaining_and_reset_after_traffic(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    proxy = await sidecar(policy, upstream.url)
    admin = await sidecar(policy, upstream.url, admin=True)
    statuses = [await traffic(proxy, "GET", "/v1/search", ACME) for _ in range(3)]
    statuses.append(await traffic(proxy, "POST", "/v1/exports/9", ACME))
    assert statuses == [200, 200, 200, 200]

    response = await admin.get("/admin/customers/acme/usage")
    document = await response.json()
    now = time.time()
    assert response.status == 200
    assert (document["customer"], document["plan"]) == ("acme", "pro")
    rows = document["limits"]
    without_reset = [{k: v for k, v in row.items() if k != "reset"} for row in rows]
    assert without_reset == [
        {"meter": "requests", "period": "month", "feature": None, "limit": 100, "used": 13, "remaining": 87},
        {"meter": "requests", "period": "minute", "feature": None, "limit": 50, "used": 13, "remaining": 37},
        {"meter": "requests", "period": "day", "feature": "export", "limit": 30, "used": 10, "remaining": 20},
        {"meter": "tokens", "period": "month", "feature": None, "limit": 1000, "used": 0, "remaining": 1000},
    ]
    anchored_reset = rfc3339(calendar_window(Period.MONTH, now, ANCHOR)[1])
    assert rows[0]["reset"] == anchored_reset
    assert rows[0]["reset"][8:] == "15T00:00:00Z"
    assert now < parse_rfc3339(rows[1]["reset"]) <= now + 61
    assert rows[2]["reset"] == rfc3339(calendar_window(Period.DAY, now)[1])
    assert rows[3]["reset"] == anchored_reset


async def test_usage_document_before_any_traffic_shows_the_whole_limit(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    admin = await sidecar(policy, upstream.url, admin=True)
    document = await (await admin.get("/admin/customers/bob/usage")).json()
    assert document == {
        "customer": "bob",
        "plan": "free",
        "limits": [
            {
                "meter": "requests",
                "period": "month",
                "feature": None,
                "limit": 5,
                "used": 0,
                "remaining": 5,
                "reset": rfc3339(calendar_window(Period.MONTH, time.time())[1]),
            }
        ],
    }


async def test_usage_document_does_not_charge_anything(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    proxy = await sidecar(policy, upstream.url)
    admin = await sidecar(policy, upstream.url, admin=True)
    assert await traffic(proxy, "GET", "/v1/search", BOB) == 200
    for _ in range(3):
        document = await (await admin.get("/admin/customers/bob/usage")).json()
    assert (document["limits"][0]["used"], document["limits"][0]["remaining"]) == (1, 4)


async def test_usage_remaining_is_zero_after_the_quota_is_spent(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    proxy = await sidecar(policy, upstream.url)
    admin = await sidecar(policy, upstream.url, admin=True)
    statuses = [await traffic(proxy, "GET", "/v1/search", BOB) for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    row = (await (await admin.get("/admin/customers/bob/usage")).json())["limits"][0]
    assert (row["used"], row["remaining"]) == (5, 0)


async def test_unknown_customer_usage_is_404_problem(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    admin = await sidecar(policy, upstream.url, admin=True)
    response = await admin.get("/admin/customers/mallory/usage")
    body = await response.json(content_type="application/problem+json")
    assert (response.status, body["status"]) == (404, 404)
    assert {"type", "title", "detail"} <= body.keys()
    assert "mallory" in body["detail"]


# -- bearer token ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer "},
     {"Authorization": "Bearer s3cret-and-more"}, {"X-API-Key": "s3cret"}],
    ids=["none", "wrong", "basic-scheme", "empty", "longer", "other-header"],
)  # fmt: skip
async def test_admin_api_without_the_right_token_is_401(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream, headers: dict[str, str]
) -> None:
    admin = await sidecar(policy, upstream.url, admin=True, admin_token="s3cret")
    response = await admin.get("/admin/customers/acme/usage", headers=headers)
    body = await response.json(content_type="application/problem+json")
    assert (response.status, body["status"]) == (401, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
async def test_admin_api_with_the_bearer_token_is_200(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream, scheme: str
) -> None:
    admin = await sidecar(policy, upstream.url, admin=True, admin_token="s3cret")
    response = await admin.get("/admin/customers/acme/usage", headers={"Authorization": f"{scheme} s3cret"})
    assert response.status == 200
    assert (await response.json())["customer"] == "acme"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_probes_and_metrics_need_no_token(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream, path: str
) -> None:
    admin = await sidecar(policy, upstream.url, admin=True, admin_token="s3cret")
    assert (await admin.get(path)).status == 200


async def test_token_check_comes_before_the_customer_lookup(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    admin = await sidecar(policy, upstream.url, admin=True, admin_token="s3cret")
    assert (await admin.get("/admin/customers/mallory/usage")).status == 401
