"""The deny cache: a refused customer is refused again without a store call until the refusing
limit resets; a reload or a plan change forgets it; credit and reservations are held 1 s at most."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.admission.deny_cache import VOLATILE_SECONDS, DenyCache, hold_seconds
from sidecar.admission.verdict import Decision, Verdict
from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.model import Customer, Feature, Limit, Policy
from sidecar.config.policy.windows import Period
from sidecar.http.app import build_admin_app, build_proxy_app
from sidecar.http.components import Components
from sidecar.store.port import CreditCharge, CreditState, LimitCharge, LimitState
from tests.conftest import Upstream, key_hash, make_components, write_policy

Client = TestClient[web.Request, web.Application]
ACME = {"X-API-Key": "acme-key-1"}
POLICY = f"""
version: 1
meters: {{requests: {{aggregation: count}}}}
features:
  - {{name: search, match: {{path: /v1/search}}}}
  - {{name: export, match: {{path: /v1/export}}}}
plans:
  free:
    features: [search, export]
    limits:
      - {{meter: requests, limit: 2, period: day}}
      - {{meter: requests, limit: 1000, period: second}}
  pro: {{features: [search, export], limits: [{{meter: requests, limit: 100, period: day}}]}}
  burst: {{features: [search], limits: [{{meter: requests, limit: 1, period: second}}]}}
customers:
  acme: {{plan: free, api_keys: ["{key_hash("acme-key-1")}"]}}
"""


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(tmp_path, POLICY)


@pytest.fixture
async def plain(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def replica(
    aiohttp_client: Callable[..., Awaitable[Client]], redis_url: str, upstream: Upstream, policy: Path
) -> Callable[[], Awaitable[tuple[Client, Client, Components]]]:
    """A proxy and an admin app sharing one set of components, as `sidecar run` builds them."""

    async def make() -> tuple[Client, Client, Components]:
        components = make_components(policy, upstream.url, redis_url)
        proxy = await aiohttp_client(build_proxy_app(components), server_kwargs={"host": "127.0.0.1"})
        admin_app = build_admin_app(components)
        admin_app.on_cleanup.append(lambda _: components.store.close())
        admin = await aiohttp_client(admin_app, server_kwargs={"host": "127.0.0.1"})
        return proxy, admin, components

    return make


async def evalsha_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def get(proxy: Client, path: str = "/v1/search") -> tuple[int, dict[str, Any], dict[str, str]]:
    response = await proxy.get(path, headers=ACME)
    body = await response.json()
    return response.status, body, dict(response.headers)


async def test_a_refused_customer_gets_the_same_429_without_a_store_call(
    replica: Callable[[], Awaitable[tuple[Client, Client, Components]]], plain: aioredis.Redis
) -> None:
    proxy, _, components = await replica()
    assert [(await get(proxy))[0] for _ in range(2)] == [200, 200]
    status, first, first_headers = await get(proxy)
    assert status == 429
    before = await evalsha_calls(plain)
    for _ in range(5):
        status, again, headers = await get(proxy)
        assert status == 429
        assert again == first, "the same problem body: meter, limit, period, remaining, reset, policies"
        assert headers["Content-Type"] == first_headers["Content-Type"] == "application/problem+json"
        assert 1 <= int(headers["Retry-After"]) <= int(first_headers["Retry-After"])
        assert headers["RateLimit-Policy"] == first_headers["RateLimit-Policy"]
        assert headers["RateLimit"].split(";")[:2] == first_headers["RateLimit"].split(";")[:2]
    assert await evalsha_calls(plain) == before, "no EVALSHA for a refusal already known"
    assert components.denials.hits == 5
    assert first["violated-policies"] == ["requests-day"]
    metrics = components.metrics.exposition().decode()
    assert 'sidecar_requests_total{decision="refused",feature="search",plan="free"} 6.0' in metrics


async def test_another_feature_is_still_asked_of_the_store(
    replica: Callable[[], Awaitable[tuple[Client, Client, Components]]], plain: aioredis.Redis
) -> None:
    proxy, _, _ = await replica()
    statuses = [(await get(proxy))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    before = await evalsha_calls(plain)
    assert (await get(proxy, "/v1/export"))[0] == 429
    assert await evalsha_calls(plain) == before + 1


async def test_the_cached_refusal_ends_at_the_limits_reset(
    tmp_path: Path,
    aiohttp_client: Callable[..., Awaitable[Client]],
    redis_url: str,
    upstream: Upstream,
    plain: aioredis.Redis,
) -> None:
    policy = write_policy(tmp_path, POLICY.replace("acme: {plan: free", "acme: {plan: burst"), "burst.yaml")
    components = make_components(policy, upstream.url, redis_url)
    app = build_proxy_app(components)
    app.on_cleanup.append(lambda _: components.store.close())
    proxy = await aiohttp_client(app, server_kwargs={"host": "127.0.0.1"})
    assert (await get(proxy))[0] == 200
    status, body, headers = await get(proxy)
    assert status == 429 and body["period"] == "second"
    (_, reset), *_ = [item.split(";t=") for item in headers["RateLimit"].split(", ")]
    before = await evalsha_calls(plain)
    assert (await get(proxy))[0] == 429
    assert await evalsha_calls(plain) == before, "refused from the cache while the second lasts"
    await asyncio.sleep(int(reset) + 0.05)
    assert (await get(proxy))[0] == 200, "after the reset the store is asked again, and admits"
    assert await evalsha_calls(plain) == before + 1


async def test_a_plan_change_through_the_admin_api_ends_the_cached_refusal(
    replica: Callable[[], Awaitable[tuple[Client, Client, Components]]],
) -> None:
    proxy, admin, components = await replica()
    assert [(await get(proxy))[0] for _ in range(3)] == [200, 200, 429]
    assert (await get(proxy))[0] == 429 and components.denials.hits == 1
    response = await admin.put(
        "/admin/customers/acme", json={"plan": "pro", "api_keys": [key_hash("acme-key-1")]}
    )
    assert response.status == 200
    assert (await get(proxy))[0] == 200


async def test_a_policy_reload_ends_the_cached_refusal(
    replica: Callable[[], Awaitable[tuple[Client, Client, Components]]], policy: Path
) -> None:
    proxy, _, components = await replica()
    assert [(await get(proxy))[0] for _ in range(3)] == [200, 200, 429]
    policy.write_text(POLICY.replace("limit: 2, period: day", "limit: 5, period: day"))
    components.holder.reload()
    assert (await get(proxy))[0] == 200


# -- the cache itself -----------------------------------------------------------------------------


SEARCH = Feature(name="search", method=None, path="/v1/search")


def a_policy(tmp_path: Path, name: str = "policy.yaml") -> Policy:
    return load_policy(write_policy(tmp_path, POLICY, name))


def refusal(customer: Customer, *states: LimitState, credits: tuple[CreditState, ...] = ()) -> Verdict:
    return Verdict(
        decision=Decision.REFUSED,
        feature=SEARCH,
        customer=customer,
        limits=states,
        credits=credits,
        store_time=1000.0,
    )


def over(reset: float, period: Period = Period.DAY, **charge: Any) -> LimitState:
    limit = Limit(meter="requests", limit=2, period=period)
    options = {"amount": 1, "window": None, "enforced": True, **charge}
    return LimitState(LimitCharge(limit, **options), used=2, reset_seconds=reset, over=True)


def within(reset: float) -> LimitState:
    limit = Limit(meter="requests", limit=100, period=Period.HOUR)
    return LimitState(LimitCharge(limit, 1, None, True), used=3, reset_seconds=reset, over=False)


ACME_CUSTOMER = Customer(id="acme", plan="free")


@pytest.mark.parametrize(
    ("states", "credits", "seconds"),
    [
        pytest.param((over(30.0), within(5.0)), (), 30.0, id="a hard limit: until its reset"),
        pytest.param((over(30.0), over(400.0)), (), 400.0, id="two: until the last one resets"),
        pytest.param((over(30.0, reserved=True),), (), VOLATILE_SECONDS, id="a reservation: 1 s"),
        pytest.param((over(30.0, amount=0),), (), VOLATILE_SECONDS, id="a response-time meter: 1 s"),
        pytest.param((over(30.0, allowance=True),), (), VOLATILE_SECONDS, id="an allowance: 1 s"),
        pytest.param(
            (within(30.0),),
            (CreditState(CreditCharge("tokens", 10, True), granted=5, balance=2, over=True),),
            VOLATILE_SECONDS,
            id="prepaid credit: 1 s",
        ),
        pytest.param(
            (over(30.0), over(400.0, reserved=True)), (), 30.0, id="hard and volatile: the hard one"
        ),
        pytest.param((over(0.4),), (), 0.4, id="a limit resetting sooner than 1 s"),
    ],
)
def test_how_long_a_refusal_is_held(
    states: tuple[LimitState, ...], credits: tuple[CreditState, ...], seconds: float
) -> None:
    assert hold_seconds(refusal(ACME_CUSTOMER, *states, credits=credits)) == pytest.approx(seconds)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_refusal_is_served_aged_and_dropped_at_its_reset(tmp_path: Path) -> None:
    clock, policy = Clock(), a_policy(tmp_path)
    cache = DenyCache(clock=clock)
    verdict = refusal(ACME_CUSTOMER, over(30.0))
    cache.note(policy, verdict)
    clock.now += 10
    aged = cache.known(policy, ACME_CUSTOMER, SEARCH)
    assert aged is not None and aged.limits[0].reset_seconds == pytest.approx(20.0)
    assert aged.store_time == pytest.approx(1010.0), "the absolute reset stays the same"
    clock.now += 20
    assert cache.known(policy, ACME_CUSTOMER, SEARCH) is None
    assert len(cache) == 0


def test_another_customer_object_or_policy_misses(tmp_path: Path) -> None:
    clock, policy = Clock(), a_policy(tmp_path)
    cache = DenyCache(clock=clock)
    cache.note(policy, refusal(ACME_CUSTOMER, over(30.0)))
    replaced = Customer(id="acme", plan="free")  # equal, but a new object: the directory changed
    assert cache.known(policy, replaced, SEARCH) is None
    cache.note(policy, refusal(ACME_CUSTOMER, over(30.0)))
    reloaded = a_policy(tmp_path, "reloaded.yaml")
    assert cache.known(reloaded, ACME_CUSTOMER, SEARCH) is None
    cache.note(reloaded, refusal(ACME_CUSTOMER, over(30.0)))
    assert cache.known(reloaded, ACME_CUSTOMER, SEARCH) is not None


def test_the_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    policy = a_policy(tmp_path)
    cache = DenyCache(size=2, clock=Clock())
    customers = [Customer(id=f"c{i}", plan="free") for i in range(3)]
    for customer in customers[:2]:
        cache.note(policy, refusal(customer, over(30.0)))
    assert cache.known(policy, customers[0], SEARCH) is not None  # c0 used last
    cache.note(policy, refusal(customers[2], over(30.0)))
    assert len(cache) == 2
    assert cache.known(policy, customers[1], SEARCH) is None
    assert cache.known(policy, customers[0], SEARCH) is not None
    cache.forget("c0")
    assert cache.known(policy, customers[0], SEARCH) is None
