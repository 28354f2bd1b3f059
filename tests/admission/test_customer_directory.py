"""The customer directory and its key cache (admission/customers.py, customer_cache.py) over the
in-memory CustomerStore: what is cached and for how long, what a change drops, that a lookup
begun before a change is not cached after it, one lookup for concurrent misses of one key, and
what a store outage answers."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from sidecar.admission.customer_cache import DEGRADED_TTL_SECONDS, TTL_SECONDS, KeyCache
from sidecar.admission.customers import CustomerDirectory
from sidecar.config.policy.holder import PolicyHolder
from sidecar.config.policy.model import Customer, Policy
from sidecar.errors import StoreUnavailable
from sidecar.store.memory.customers import MemoryCustomers
from sidecar.store.port import CustomerChange
from tests.helpers import ManualClock, key_hash, write_policy


def h(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


CAROL = Customer(id="carol", plan="pro", api_key_hashes=(h("carol-key"),))


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters: {{requests: {{aggregation: count}}}}
        features: [{{name: search, match: {{path: /v1/search}}}}]
        plans: {{free: {{features: [search]}}, pro: {{features: [search]}}}}
        customers:
          acme: {{plan: free, api_keys: ["{key_hash("acme-key")}"]}}
        """,
    )


@pytest.fixture
def policy(policy_path: Path) -> Policy:
    return PolicyHolder.load(policy_path).current


class Counting(MemoryCustomers):
    """The memory store, counting lookups, and able to fail or hold them."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0
        self.down = False
        self.held: asyncio.Event | None = None

    async def lookup(self, key_hash: str) -> tuple[str | None, Customer | None]:
        self.lookups += 1
        if self.down:
            raise StoreUnavailable("down")
        if self.held is not None:
            await self.held.wait()
        return await super().lookup(key_hash)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(0.0)


@pytest.fixture
def store() -> Counting:
    return Counting()


@pytest.fixture
def directory(store: Counting, clock: ManualClock) -> CustomerDirectory:
    return CustomerDirectory(store, cache=KeyCache(clock=clock, size=3, unknown_size=2))


async def test_a_stored_customer_and_an_unknown_key_are_each_looked_up_once(
    directory: CustomerDirectory, store: Counting, policy: Policy
) -> None:
    await store.put_many([CAROL])
    for _ in range(3):
        assert await directory.by_key_hash(h("carol-key"), policy) == CAROL
        assert await directory.by_key_hash(h("nobody"), policy) is None
    assert store.lookups == 2


async def test_entries_expire_and_are_trusted_less_while_changes_cannot_be_read(
    directory: CustomerDirectory, store: Counting, policy: Policy, clock: ManualClock
) -> None:
    await store.put_many([CAROL])
    await directory.by_key_hash(h("carol-key"), policy)
    clock.now += TTL_SECONDS - 0.1
    await directory.by_key_hash(h("carol-key"), policy)
    assert store.lookups == 1
    clock.now += 0.2
    await directory.by_key_hash(h("carol-key"), policy)
    assert store.lookups == 2
    directory.cache.degraded = True
    clock.now += DEGRADED_TTL_SECONDS + 0.1
    await directory.by_key_hash(h("carol-key"), policy)
    assert store.lookups == 3


async def test_a_change_drops_the_customers_keys_and_an_added_keys_unknown_entry(
    directory: CustomerDirectory, store: Counting, policy: Policy
) -> None:
    await store.put_many([CAROL])
    assert await directory.by_key_hash(h("carol-key"), policy) == CAROL
    assert await directory.by_key_hash(h("carol-new"), policy) is None
    await store.put_many([Customer(id="carol", plan="free", api_key_hashes=(h("carol-new"),))])
    directory.apply(CustomerChange(("carol",), (h("carol-new"),)))
    assert await directory.by_key_hash(h("carol-key"), policy) is None
    found = await directory.by_key_hash(h("carol-new"), policy)
    assert found is not None and found.plan == "free"


async def test_an_import_batch_drops_every_unknown_key(
    directory: CustomerDirectory, store: Counting, policy: Policy
) -> None:
    await directory.by_key_hash(h("later"), policy)
    await store.put_many([Customer(id="dave", plan="pro", api_key_hashes=(h("later"),))])
    directory.apply(CustomerChange(("dave",), unknown_keys=True))
    assert await directory.by_key_hash(h("later"), policy) is not None


async def test_a_lookup_that_spans_a_change_is_answered_but_not_cached(
    directory: CustomerDirectory, store: Counting, policy: Policy
) -> None:
    await store.put_many([CAROL])
    store.held = asyncio.Event()
    looking = asyncio.ensure_future(directory.by_key_hash(h("carol-key"), policy))
    await asyncio.sleep(0)
    directory.apply(CustomerChange(("carol",)))
    store.held.set()
    assert await looking == CAROL
    assert len(directory.cache) == 0


async def test_concurrent_misses_of_one_key_share_one_lookup(
    directory: CustomerDirectory, store: Counting, policy: Policy
) -> None:
    await store.put_many([CAROL])
    store.held = asyncio.Event()
    lookups = [asyncio.ensure_future(directory.by_key_hash(h("carol-key"), policy)) for _ in range(5)]
    await asyncio.sleep(0)
    store.held.set()
    assert await asyncio.gather(*lookups) == [CAROL] * 5
    assert store.lookups == 1


async def test_a_stored_entry_replaces_the_files_and_a_reload_forgets_everything(
    directory: CustomerDirectory, store: Counting, policy: Policy, policy_path: Path
) -> None:
    acme = await directory.by_key_hash(h("acme-key"), policy)
    assert acme is not None and acme.plan == "free"
    await store.put_many([Customer(id="acme", plan="pro", api_key_hashes=(h("acme-2"),))])
    directory.apply(CustomerChange(("acme",)))
    assert await directory.by_key_hash(h("acme-key"), policy) is None, "keys included"
    reloaded = PolicyHolder.load(policy_path).current
    lookups = store.lookups
    await directory.by_key_hash(h("acme-key"), reloaded)
    assert store.lookups == lookups + 1


async def test_during_an_outage_known_keys_and_file_keys_still_identify(
    directory: CustomerDirectory, store: Counting, policy: Policy, clock: ManualClock
) -> None:
    await store.put_many([CAROL])
    await directory.by_key_hash(h("carol-key"), policy)
    store.down = True
    clock.now += TTL_SECONDS + 1
    assert await directory.by_key_hash(h("carol-key"), policy) == CAROL, "its last known customer"
    acme = await directory.by_key_hash(h("acme-key"), policy)
    assert acme is not None and acme.id == "acme"
    with pytest.raises(StoreUnavailable):
        await directory.by_key_hash(h("never-seen"), policy)


async def test_the_cache_is_bounded_least_recently_used_first(clock: ManualClock) -> None:
    cache = KeyCache(size=2, unknown_size=1, clock=clock)
    for name in ("a", "b", "c"):
        cache.put(name, CAROL, "carol", cache.generation)
    cache.put("x", None, None, cache.generation)
    cache.put("y", None, None, cache.generation)
    assert [k for k in "abcxy" if cache.get(k) is not None] == ["b", "c", "y"]
    cache.forget_customers(["carol"])
    assert len(cache) == 1


async def test_watch_follows_the_stores_changes(
    directory: CustomerDirectory, store: Counting, policy: Policy
) -> None:
    await directory.refresh()
    await store.put_many([CAROL])
    assert await directory.by_key_hash(h("carol-key"), policy) == CAROL
    watching = asyncio.ensure_future(directory.watch())
    try:
        await store.put_many([Customer(id="carol", plan="free")])
        for _ in range(100):
            if await directory.by_key_hash(h("carol-key"), policy) is None:
                break
            await asyncio.sleep(0.01)
        assert await directory.by_key_hash(h("carol-key"), policy) is None
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
