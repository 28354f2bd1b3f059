"""The store behind Redis Sentinel: a write refused by a replica, and a failover that moves the
master to the replica, after which calls are still exact. The exactness tests run behind Sentinel
too, as parameters of their own suites (tests/topologies.py, on_topologies)."""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.errors import StoreUnavailable
from sidecar.store.port import Outcome
from sidecar.store.redis.pipeline import CLIENT_NAME, ScriptBatcher
from sidecar.store.redis.store import RedisStore
from tests.helpers import month_charge, request_for
from tests.topologies import SentinelGroup, node_client, on_topologies, wait_until

FAILOVER_SERVICE_TIMEOUT = 30.0  # seconds a loaded CI machine may take to serve again after a failover


async def admit(store: RedisStore, limit: int, now: float) -> Outcome | None:
    """One admission against a month quota of ``limit``; None when the store could not answer."""
    try:
        return (await store.check_and_meter(request_for(month_charge(limit, now=now)))).outcome
    except StoreUnavailable:
        return None


def batch_connections(port: int) -> list[dict[str, str]]:
    with node_client(port) as server:
        return [client for client in server.client_list() if client["name"] == CLIENT_NAME]


async def test_a_write_refused_by_a_replica_fails_the_call_and_closes_its_connection(
    sentinel_group: SentinelGroup,
) -> None:
    """What a master demoted by a failover answers (READONLY): the call fails, and the connection
    to that server is closed rather than kept, so the next calls ask where the master is."""
    ports = (sentinel_group.master_port, sentinel_group.replica_port)
    replica = next(port for port in ports if port != sentinel_group.current_master())
    batcher = ScriptBatcher.of_url(f"redis://127.0.0.1:{replica}/0", timeout=2.0)
    write = batcher.register("return redis.call('INCR', KEYS[1])")
    try:
        await batcher.connect()
        with pytest.raises(StoreUnavailable, match="READONLY"):
            await write(["sc:{c:acme}:x"])
        wait_until(lambda: not batch_connections(replica), "the replica connection to close", timeout=5)
    finally:
        await batcher.close()


# Last of the session's tests behind Sentinel: the group serves on after it, with the roles swapped.
@on_topologies("sentinel")
async def test_after_a_failover_calls_reach_the_new_master_and_stay_exact(
    sentinel_group: SentinelGroup, store: RedisStore
) -> None:
    now = store.time()
    before = [await admit(store, 30, now) for _ in range(10)]
    assert before == [Outcome.ADMITTED] * 10
    old = sentinel_group.current_master()
    new = await asyncio.to_thread(sentinel_group.fail_over)
    assert new != old
    deadline = time.monotonic() + FAILOVER_SERVICE_TIMEOUT
    outcome = await admit(store, 30, now)
    while outcome is None and time.monotonic() < deadline:  # answered as an outage until it finds the master
        await asyncio.sleep(0.1)
        outcome = await admit(store, 30, now)
    assert outcome is Outcome.ADMITTED
    after = await asyncio.gather(*(admit(store, 30, now) for _ in range(40)))
    assert after.count(Outcome.ADMITTED) == 19  # 10 + 1 + 19 = the quota of 30, not one more
    assert after.count(Outcome.REFUSED) == 21
    assert store.batcher.locator.endpoint(0).port == new  # type: ignore[union-attr]
    with node_client(new) as master:
        counters = [int(master.get(key) or 0) for key in master.keys("*:q:*")]
    assert counters == [30]
