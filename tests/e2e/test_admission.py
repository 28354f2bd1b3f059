"""What a customer's client sees (SPEC §4), through real sidecar apps, a real upstream and real Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import SidecarFactory
from tests.helpers import ACME, Upstream, key_hash, quota_policy, raw_exchange, write_policy
from tests.topologies import all_topologies

BOB = "bob-key-1"


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
          - {{name: health, match: {{path: /healthz}}, public: true}}
          - {{name: search, match: {{method: GET, path: /v1/search}}}}
          - {{name: export, match: {{method: POST, path: "/v1/exports/{{id}}"}}, cost: {{requests: 10}}}}
          - {{name: complete, match: {{path: /v1/completions}}}}
        plans:
          free:
            features: [search]
            limits:
              - {{meter: requests, limit: 3, period: month}}
          pro:
            features: [search, export, complete]
            limits:
              - {{meter: requests, limit: 25, period: month}}
              - {{meter: requests, limit: 100, period: second}}
              - {{meter: tokens, limit: 1000, period: month}}
        customers:
          acme: {{plan: pro, api_keys: ["{key_hash(ACME)}"]}}
          bob: {{plan: free, api_keys: ["{key_hash(BOB)}"]}}
        """,
    )


async def test_admitted_request_reaches_upstream_with_the_real_identity(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy, upstream.url)
    response = await client.get(
        "/v1/search?q=a%20b&x=1",
        headers={"X-API-Key": BOB, "X-Customer-Id": "mallory", "X-Customer-Plan": "pro"},
    )
    assert response.status == 200
    seen = dict((k.lower(), v) for k, v in upstream.seen[0]["headers"])  # type: ignore[union-attr]
    assert (seen["x-customer-id"], seen["x-customer-plan"]) == ("bob", "free")
    assert upstream.seen[0]["raw_path"] == "/v1/search?q=a%20b&x=1"
    assert response.headers["X-Upstream"] == "yes"


async def test_bearer_authorization_identifies_the_customer(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy, upstream.url)
    response = await client.get("/v1/search", headers={"Authorization": f"Bearer {ACME}"})
    assert response.status == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "nope"}, {"Authorization": f"Basic {ACME}"}, {"X-API-Key": ""}],
    ids=["none", "unknown", "not-bearer", "empty"],
)
async def test_missing_or_unknown_key_is_401_with_www_authenticate(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream, headers: dict[str, str]
) -> None:
    client = await sidecar(policy, upstream.url)
    response = await client.get("/v1/search", headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.content_type == "application/problem+json"
    assert upstream.seen == []


async def test_feature_outside_the_plan_is_403_naming_feature_and_plan(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy, upstream.url)
    response = await client.post("/v1/exports/7", headers={"X-API-Key": BOB})
    body = await response.json(content_type="application/problem+json")
    assert (response.status, body["feature"], body["plan"]) == (403, "export", "free")
    assert upstream.seen == []


async def test_route_matching_no_feature_is_404_problem(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy, upstream.url)
    response = await client.get("/v2/unknown", headers={"X-API-Key": ACME})
    assert response.status == 404
    assert (await response.json(content_type="application/problem+json"))["status"] == 404


async def test_method_outside_the_template_is_404(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy, upstream.url)
    assert (await client.post("/v1/search", headers={"X-API-Key": ACME})).status == 404


async def test_public_route_skips_identity_and_metering(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy, upstream.url)
    statuses = [(await client.get("/healthz", headers={"X-Customer-Id": "mallory"})).status for _ in range(5)]
    assert statuses == [200] * 5
    assert "RateLimit" not in (await client.get("/healthz")).headers
    seen = {k.lower() for k, _ in upstream.seen[0]["headers"]}  # type: ignore[union-attr]
    assert "x-customer-id" not in seen


async def test_quota_exceeded_is_429_with_retry_after_and_problem_details(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy, upstream.url)
    for _ in range(3):
        assert (await client.get("/v1/search", headers={"X-API-Key": BOB})).status == 200
    refused = await client.get("/v1/search", headers={"X-API-Key": BOB})
    body = await refused.json(content_type="application/problem+json")
    assert refused.status == 429
    assert body["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
    assert (body["meter"], body["limit"], body["period"], body["remaining"]) == ("requests", 3, "month", 0)
    assert body["violated-policies"] == ["requests-month"]
    assert body["reset"].endswith("-01T00:00:00Z")
    ratelimit_t = int(refused.headers["RateLimit"].split("t=")[1])
    assert int(refused.headers["Retry-After"]) >= ratelimit_t > 0
    assert len(upstream.seen) == 3


async def test_admitted_response_carries_draft10_ratelimit_headers_tightest_first(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy, upstream.url)
    response = await client.get("/v1/search", headers={"X-API-Key": ACME})
    policy_items = response.headers["RateLimit-Policy"].split(", ")
    assert policy_items[0].startswith('"requests-month";q=25;w=')
    assert '"requests-second";q=100;w=1' in policy_items
    assert any(
        item.startswith('"tokens-month";q=1000;w=') and item.endswith(';sc-qu="tokens"')
        for item in policy_items
    )
    assert response.headers["RateLimit"].startswith('"requests-month";r=24;t=')


async def test_weighted_cost_against_a_quota_not_a_multiple_is_all_or_nothing(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy, upstream.url)
    statuses = [(await client.post("/v1/exports/1", headers={"X-API-Key": ACME})).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    search = await client.get("/v1/search", headers={"X-API-Key": ACME})
    assert search.headers["RateLimit"].startswith('"requests-month";r=4;')


@all_topologies
async def test_quota_of_n_admits_exactly_n_across_two_replicas_under_concurrency(
    sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream
) -> None:
    quota, clients_per_replica = 57, 120
    policy = quota_policy(tmp_path, quota, "day")
    replicas = [await sidecar(policy, upstream.url), await sidecar(policy, upstream.url)]

    async def call(index: int) -> int:
        response = await replicas[index % 2].get("/v1/search", headers={"X-API-Key": ACME})
        await response.read()
        return response.status

    statuses = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(2 * clients_per_replica))), 60)
    assert statuses.count(200) == quota
    assert statuses.count(429) == 2 * clients_per_replica - quota
    assert len(upstream.seen) == quota


@pytest.mark.parametrize("path", ["/v1/search/..", "/v1/%2E%2E/v1/search", "/v1/./search"])
async def test_path_with_dot_segments_is_400_and_never_routed(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream, path: str
) -> None:
    client = await sidecar(policy, upstream.url)
    assert client.port is not None
    head = f"GET {path} HTTP/1.1\r\nHost: api\r\nX-API-Key: {ACME}\r\nConnection: close\r\n\r\n"
    status, _ = await raw_exchange(client.port, head)
    assert status == 400
    assert upstream.seen == []


async def test_a_customer_reads_its_own_usage_with_its_own_key(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy, upstream.url)
    await client.get("/v1/search", headers={"X-API-Key": BOB})
    response = await client.get("/_sidecar/usage", headers={"X-API-Key": BOB})
    document = await response.json()
    assert (document["customer"], document["plan"]) == ("bob", "free")
    assert [(row["meter"], row["period"], row["used"], row["remaining"]) for row in document["limits"]] == [
        ("requests", "month", 1, 2)
    ]
    assert upstream.seen[-1]["path"] == "/v1/search"


async def test_own_usage_without_a_valid_key_is_401(
    sidecar: SidecarFactory, policy: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy, upstream.url)
    response = await client.get("/_sidecar/usage", headers={"X-API-Key": "nope"})
    assert response.status == 401
    assert upstream.seen == []
