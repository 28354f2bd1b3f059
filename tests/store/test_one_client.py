"""One store, one client stack: admission, the journal, the billing outbox and the stored customers
share the RedisStore's redis-py client (and the hot path its batcher), each operation within its
own time bound; and the components around it are composed by one factory (http/components.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from sidecar.config.policy.holder import PolicyHolder
from sidecar.config.policy.model import Customer
from sidecar.errors import StoreUnavailable
from sidecar.http.components import open_components
from sidecar.store.port import MeterRequest
from sidecar.store.redis.calls import BACKGROUND_TIMEOUT
from sidecar.store.redis.pipeline import CLIENT_NAME
from sidecar.store.redis.store import MAX_CONNECTIONS, RedisStore
from tests.conftest import settings_for, write_policy

# Keeps Redis busy (and every other client waiting) for ARGV[1] microseconds.
SPIN = """
local t0 = redis.call('TIME')
while true do
  local t = redis.call('TIME')
  if (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) >= tonumber(ARGV[1]) then return 1 end
end
"""
POLICY = """
version: 1
meters: {requests: {aggregation: count}}
features: [{name: search, match: {path: /v1/search}}]
plans: {pro: {features: [search]}}
"""
CAROL = Customer(id="carol", plan="pro", api_key_hashes=("ab" * 32,), billing_anchor=date(2026, 1, 31))


@pytest.fixture
async def plain(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def test_the_outbox_and_the_customers_are_the_stores_own_on_its_one_client(store: RedisStore) -> None:
    assert store.outbox.client is store.client
    assert store.customers.client is store.client
    assert store.client.connection_pool.max_connections == MAX_CONNECTIONS


async def test_stored_customers_round_trip_through_the_port(store: RedisStore) -> None:
    assert await store.customers.get_many(["carol", "dave"]) == {}
    await store.customers.put_many([CAROL, Customer(id="dave", plan="free")])
    assert await store.customers.get_many(["carol", "dave"]) == {
        "carol": CAROL,
        "dave": Customer(id="dave", plan="free"),
    }


async def test_each_operation_keeps_its_own_time_bound_on_the_one_client(
    redis_url: str, plain: aioredis.Redis
) -> None:
    store = RedisStore.open(redis_url, 0.05)
    try:
        await store.ping()
        spin = asyncio.ensure_future(plain.eval(SPIN, 0, 400_000))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        refresh = asyncio.ensure_future(store.customers.feed_position())
        with pytest.raises(StoreUnavailable):
            await store.ping()  # what a request waits on: the store timeout
        assert time.perf_counter() - started < 0.3
        assert await refresh == "0-0", "background work waits for a busy store, up to BACKGROUND_TIMEOUT"
        assert time.perf_counter() - started < BACKGROUND_TIMEOUT
        await spin
    finally:
        await store.close()


async def test_one_factory_opens_the_store_composes_around_it_and_closes_it(
    redis_url: str, tmp_path: Path, plain: aioredis.Redis
) -> None:
    policy = write_policy(tmp_path, POLICY)
    async with open_components(
        settings_for("http://127.0.0.1:9"), PolicyHolder.load(policy), redis_url
    ) as made:
        store = made.store
        assert isinstance(store, RedisStore)
        assert (made.outbox, made.directory.store) == (store.outbox, store.customers)
        clients = await plain.client_list()
        assert [c["name"] for c in clients].count(CLIENT_NAME) == 1, "connected at once"
        await made.directory.put([CAROL], made.holder.current)
        assert await made.directory.customer("carol", made.holder.current) == CAROL
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.check_and_meter(MeterRequest("carol", (), (), 60))
