"""The customer directory's store (store/redis/customers.py) on real Redis: one server and a
3-master Cluster. Documents, key claims (two writers racing for one key: one wins, nothing of
the other is left), stale claims of dead writers, deletes, key adds and revokes, the listing's
pages, the changes feed and the purge."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from sidecar.config.policy.model import Customer
from sidecar.store.port import Deleted, Written
from sidecar.store.redis import keys
from sidecar.store.redis.customer_claims import STALE_CLAIM_MS
from sidecar.store.redis.store import RedisStore
from tests.helpers import TEST_STORE_TIMEOUT
from tests.topologies import Cluster, on_topologies

pytestmark = on_topologies("single", "cluster")


def h(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


CAROL = Customer(id="carol", plan="pro", api_key_hashes=(h("c1"), h("c2")), stripe_customer_id="cus_1")


@pytest.fixture
async def other(redis_url: str) -> AsyncIterator[RedisStore]:
    """A second replica's store on the same Redis."""
    store = RedisStore.open(redis_url, TEST_STORE_TIMEOUT)
    yield store
    await store.close()


async def owner_entries(store: RedisStore, *hashes: str) -> dict[str, str | None]:
    client: Any = store.client
    return {
        x: (v.decode().split()[0] if (v := await client.get(keys.key_owner(x))) else None) for x in hashes
    }


async def test_a_customer_round_trips_as_key_hashes_and_its_keys_name_it(store: RedisStore) -> None:
    (result,) = await store.customers.put_many([CAROL])
    assert result.outcome is Written.STORED
    assert await store.customers.get("carol") == CAROL
    assert await store.customers.get("carol", hot=True) == CAROL
    assert await store.customers.owner(h("c1")) == "carol"
    assert await store.customers.owner(h("nobody")) is None
    assert await store.customers.lookup(h("c1")) == ("carol", CAROL)
    assert await store.customers.lookup(h("nobody")) == (None, None)
    stored = await store.client.hgetall(keys.customer("carol"))  # type: ignore[misc]
    assert {k.decode(): v for k, v in stored.items()}.keys() == {"p", "s", h("c1"), h("c2")}


async def test_a_file_customers_key_is_looked_up_with_its_stored_replacement_in_one_call(
    store: RedisStore,
) -> None:
    """lookup_file_key: the key's owner and document, and the stored customer with the file
    customer's id; one script call on one server (two in a row on a Cluster)."""
    customers = store.customers
    assert await customers.lookup_file_key(h("f1"), "frank") == (None, None, None)
    frank = Customer(id="frank", plan="pro", api_key_hashes=(h("f2"),))
    await customers.put_many([CAROL, frank])
    assert await customers.lookup_file_key(h("f1"), "frank") == (None, None, frank)
    assert await customers.lookup_file_key(h("f2"), "frank") == ("frank", frank, frank)
    assert await customers.lookup_file_key(h("c1"), "frank") == ("carol", CAROL, frank)
    await customers.delete("frank", purge=False)
    assert await customers.lookup_file_key(h("f1"), "frank") == (None, None, None)
    trips = store.batcher.round_trips
    await customers.lookup_file_key(h("c1"), "frank")
    # A Cluster: the owner, then both documents side by side (one pipeline to each master they
    # are on); one server: one call.
    sharded = store.batcher.locator.sharded
    assert store.batcher.round_trips - trips in ((2, 3) if sharded else (1,))


async def test_a_key_of_another_customer_refuses_the_whole_write(store: RedisStore) -> None:
    await store.customers.put_many([CAROL])
    dave = Customer(id="dave", plan="free", api_key_hashes=(h("d1"), h("c2")))
    (result,) = await store.customers.put_many([dave])
    assert (result.outcome, result.owners) == (Written.CONFLICT, ((1, "carol"),))
    assert await store.customers.get("dave") is None
    assert await owner_entries(store, h("d1"), h("c2")) == {h("d1"): None, h("c2"): "carol"}


async def test_a_new_document_gives_back_the_keys_it_dropped(store: RedisStore) -> None:
    await store.customers.put_many([CAROL])
    changed = dataclasses.replace(CAROL, api_key_hashes=(h("c2"), h("c3")))
    await store.customers.put_many([changed])
    assert await owner_entries(store, h("c1"), h("c2"), h("c3")) == {
        h("c1"): None,
        h("c2"): "carol",
        h("c3"): "carol",
    }
    assert await store.customers.get("carol") == changed


async def test_two_replicas_racing_for_one_key_cannot_both_win(store: RedisStore, other: RedisStore) -> None:
    for round_ in range(20):
        key = h(f"contested-{round_}")
        a = Customer(id=f"a{round_}", plan="free", api_key_hashes=(h(f"a-{round_}"), key))
        b = Customer(id=f"b{round_}", plan="free", api_key_hashes=(key, h(f"b-{round_}")))
        results = await asyncio.gather(store.customers.put_many([a]), other.customers.put_many([b]))
        outcomes = sorted(r[0].outcome.value for r in results)
        assert outcomes == ["conflict", "stored"], round_
        winner, loser = (a, b) if results[0][0].outcome is Written.STORED else (b, a)
        assert await store.customers.owner(key) == winner.id
        assert await store.customers.get(loser.id) is None
        assert await owner_entries(store, *loser.api_key_hashes) == {
            x: winner.id if x == key else None for x in loser.api_key_hashes
        }


async def test_one_customer_written_by_two_replicas_at_once_ends_consistent(
    store: RedisStore, other: RedisStore
) -> None:
    for round_ in range(20):
        one = Customer(id="eve", plan="free", api_key_hashes=(h(f"e{round_}a"), h("shared")))
        two = Customer(id="eve", plan="pro", api_key_hashes=(h(f"e{round_}b"),))
        await asyncio.gather(store.customers.put_many([one]), other.customers.put_many([two]))
        final = await store.customers.get("eve")
        assert final in (one, two)
        every = {*one.api_key_hashes, *two.api_key_hashes}
        owners = await owner_entries(store, *every)
        assert owners == {x: "eve" if x in final.api_key_hashes else None for x in every}, round_


async def test_a_dead_writers_claim_is_taken_over_only_once_it_is_old(store: RedisStore) -> None:
    client: Any = store.client
    old = int(time.time() * 1000) - STALE_CLAIM_MS - 1000
    await client.set(keys.key_owner(h("k-old")), f"ghost t0 {old}")
    await client.set(keys.key_owner(h("k-new")), f"ghost t0 {int(time.time() * 1000)}")
    taken = Customer(id="frank", plan="free", api_key_hashes=(h("k-old"),))
    young = Customer(id="gina", plan="free", api_key_hashes=(h("k-new"),))
    results = await store.customers.put_many([taken, young])
    assert [r.outcome for r in results] == [Written.STORED, Written.CONFLICT]
    assert await store.customers.owner(h("k-old")) == "frank"


async def test_a_claim_its_owner_does_not_list_does_not_identify_anyone(store: RedisStore) -> None:
    await store.client.set(keys.key_owner(h("dangling")), "ghost t0 1")
    assert await store.customers.owner(h("dangling")) == "ghost"
    assert await store.customers.get("ghost", hot=True) is None  # the directory refuses it
    assert await store.customers.lookup(h("dangling")) == ("ghost", None)


async def test_delete_keeps_a_keyless_tombstone_for_billing_and_frees_the_keys(store: RedisStore) -> None:
    await store.customers.put_many([CAROL])
    assert await store.customers.delete("carol", purge=False) is Deleted.DELETED
    assert await store.customers.get("carol") is None
    assert await store.customers.get_many(["carol"], retired=True) == {
        "carol": dataclasses.replace(CAROL, api_key_hashes=())
    }
    assert await owner_entries(store, *CAROL.api_key_hashes) == dict.fromkeys(CAROL.api_key_hashes)
    assert 0 < await store.client.ttl(keys.customer("carol")) <= 40 * 86400  # type: ignore[misc]
    assert await store.customers.delete("carol", purge=False) is Deleted.ALREADY
    assert await store.customers.delete("nobody", purge=False) is Deleted.NOT_FOUND
    assert (await store.customers.page("", "", 10)).customers == ()


async def test_keys_are_added_and_revoked_one_at_a_time(store: RedisStore) -> None:
    await store.customers.put_many([CAROL, Customer(id="dave", plan="free", api_key_hashes=(h("d1"),))])
    assert (await store.customers.add_key("carol", h("c3"))).outcome is Written.STORED
    assert (await store.customers.add_key("carol", h("c3"))).outcome is Written.REPEATED
    conflict = await store.customers.add_key("carol", h("d1"))
    assert (conflict.outcome, conflict.owners) == (Written.CONFLICT, ((0, "dave"),))
    assert (await store.customers.add_key("nobody", h("n1"))).outcome is Written.NOT_FOUND
    assert await store.customers.owner(h("n1")) is None, "the claim of a refused add is given back"
    assert (await store.customers.revoke_key("carol", h("c1"))).outcome is Written.STORED
    assert (await store.customers.revoke_key("carol", h("c1"))).outcome is Written.NOT_FOUND
    stored = await store.customers.get("carol")
    assert stored is not None and set(stored.api_key_hashes) == {h("c2"), h("c3")}
    assert await owner_entries(store, h("c1"), h("c3")) == {h("c1"): None, h("c3"): "carol"}


async def test_pages_cover_every_customer_once_in_order_with_prefix_and_plan(store: RedisStore) -> None:
    fleet = [
        Customer(id=f"{p}-{i:03d}", plan="pro" if i % 3 else "free")
        for p in ("acme", "beta")
        for i in range(120)
    ]
    await store.customers.put_many(fleet)
    seen, after = [], ""
    while True:
        page = await store.customers.page("", after, 7)
        seen += [c.id for c in page.customers]
        if not page.more:
            break
        after = page.last
    assert seen == sorted(c.id for c in fleet)
    beta = await store.customers.page("beta", "", 500)
    assert [c.id for c in beta.customers] == [c.id for c in fleet if c.id.startswith("beta")]
    free = await store.customers.page("acme", "", 1000, plan="free")
    assert [c.id for c in free.customers] == [f"acme-{i:03d}" for i in range(0, 120, 3)]


async def test_the_feed_names_each_change_and_tells_when_some_were_lost(store: RedisStore) -> None:
    start = await store.customers.feed_position()
    await store.customers.put_many([CAROL])
    await store.customers.delete("carol", purge=False)
    read = await store.customers.changes(start, 0.1)
    assert [c.customers for c in read.changes] == [("carol",), ("carol",)]
    assert set(read.changes[0].key_hashes) == set(CAROL.api_key_hashes)
    assert (await store.customers.changes(read.position, 0.05)).changes == ()
    assert not (await store.customers.changes(read.position, 0.05, check_gap=True)).gap
    await store.client.delete(keys.CHANGES)
    await store.customers.put_many([Customer(id="dave", plan="free")])
    assert (await store.customers.changes(read.position, 0.05, check_gap=True)).gap


async def test_a_big_write_tells_replicas_to_forget_unknown_keys_instead_of_listing_them(
    store: RedisStore,
) -> None:
    start = await store.customers.feed_position()
    await store.customers.put_many(
        [Customer(id=f"c{i}", plan="free", api_key_hashes=(h(f"k{i}"),)) for i in range(50)]
    )
    (change,) = (await store.customers.changes(start, 0.1)).changes
    assert (len(change.customers), change.key_hashes, change.unknown_keys) == (50, (), True)


async def test_a_purge_waits_for_billing_then_erases_every_key_of_the_customer(store: RedisStore) -> None:
    client: Any = store.client
    await store.customers.put_many([CAROL, Customer(id="carolyn", plan="free")])
    names = [
        keys.usage("carol"),
        keys.grants("carol"),
        keys.quota("carol", "requests-month", 0),
        keys.outbox("carol"),
    ]
    for name in names:
        await client.hset(name, "f", "1")
    await client.set(keys.quota("carolyn", "requests-month", 0), 5)
    await client.zadd(keys.DIRTY, {"carol": 1})
    assert await store.customers.delete("carol", purge=True) is Deleted.DELETED
    assert await store.customers.purge_due(wait_for_billing=True) == []
    await client.delete(keys.usage("carol"), keys.outbox("carol"))
    await client.zadd(keys.PURGES, {"carol": 0})  # due again now
    (purged,) = await store.customers.purge_due(wait_for_billing=True)
    assert (purged.customer, purged.keys) == ("carol", 3)  # grants, quota, the tombstone
    assert not await client.exists(*[keys.customer("carol"), keys.customer_purge("carol"), *names])
    assert await client.exists(keys.quota("carolyn", "requests-month", 0)), "a neighbour's keys stay"
    assert await client.zscore(keys.DIRTY, "carol") is None
    assert await store.customers.get_many(["carol"], retired=True) == {}


async def test_a_put_cancels_a_purge_that_has_not_run(store: RedisStore) -> None:
    client: Any = store.client
    await store.customers.put_many([CAROL])
    await client.set(keys.quota("carol", "requests-month", 0), 5)
    await store.customers.delete("carol", purge=True)
    await store.customers.put_many([CAROL])
    assert await store.customers.purge_due(wait_for_billing=False) == []
    assert await client.exists(keys.quota("carol", "requests-month", 0))
    assert await store.customers.get("carol") == CAROL


async def test_documents_owner_entries_and_the_index_spread_over_the_cluster(
    store: RedisStore, redis_url: str, request: pytest.FixtureRequest
) -> None:
    if "cluster=true" not in redis_url:
        pytest.skip("a Cluster only")
    cluster: Cluster = request.getfixturevalue("cluster")
    fleet = [Customer(id=f"s{i}", plan="free", api_key_hashes=(h(f"s{i}"),)) for i in range(60)]
    await store.customers.put_many(fleet)
    documents = {cluster.master_of(keys.customer(c.id)) for c in fleet}
    owners = {cluster.master_of(keys.key_owner(c.api_key_hashes[0])) for c in fleet}
    index = {cluster.master_of(keys.customer_index(b)) for b in range(keys.INDEX_BUCKETS)}
    assert len(documents) == len(owners) == len(index) == 3


async def test_reads_of_a_plain_client_see_what_the_store_wrote(redis_url: str, store: RedisStore) -> None:
    """The owner entries and documents are plain Redis values another tool could read."""
    if "cluster=true" in redis_url:
        pytest.skip("one server")
    await store.customers.put_many([CAROL])
    plain = aioredis.Redis.from_url(redis_url)
    try:
        entry = (await plain.get(keys.key_owner(h("c1")))).decode().split()
        assert entry[0] == "carol" and len(entry) == 3
    finally:
        await plain.aclose()
