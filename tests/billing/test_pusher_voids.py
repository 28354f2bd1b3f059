"""Billing windows stay open while a journal holds a void for the customer (a 503 whose metering
call may have run), so that the undo reaches the usage before a summary of it is made: in this
process (the pusher skips the customer), in every replica (a fence in the store that close.lua
obeys, set while the void may have something to undo), and for a few seconds after any store
outage. Against a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import pytest

from sidecar.admission.customers import CustomerDirectory
from sidecar.billing import pusher as pusher_module
from sidecar.billing.marks import DirtyMarks
from sidecar.billing.pusher import Pusher
from sidecar.config.policy.holder import PolicyHolder
from sidecar.errors import StoreUnavailable, UnansweredCall
from sidecar.ledger.journal import Journal
from sidecar.ledger.merger import fence_voids
from sidecar.metrics import Metrics
from sidecar.store.redis import keys
from sidecar.store.redis.outbox import FENCED, Outbox
from sidecar.store.redis.store import RedisStore, fence_member
from tests.billing.test_outbox import AGGREGATIONS, record
from tests.conftest import key_hash, write_policy

POLICY = f"""
version: 1
meters: {{requests: {{aggregation: count}}}}
features: [{{name: search, match: {{path: /v1/search}}}}]
plans: {{p: {{features: [search]}}}}
customers: {{acme: {{plan: p, api_keys: ["{key_hash("acme-key")}"]}}}}
billing: {{url: "http://127.0.0.1:9/usage", format: json, interval: 60, grace: 0}}
"""
CALL = UnansweredCall("c0ffee0123456789", 1)


class OutboxDownOnce(Outbox):
    """An outbox whose next store call fails once `down` is set, as in a store outage."""

    down = False

    async def mark_dirty(self, dues: Mapping[str, int]) -> None:
        if self.down:
            self.down = False
            raise StoreUnavailable("down, once")
        await super().mark_dirty(dues)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def pusher_for(
    store: RedisStore, outbox: Outbox, session: aiohttp.ClientSession, tmp_path: Path, journal: Journal
) -> Pusher:
    return Pusher(
        holder=PolicyHolder.load(write_policy(tmp_path, POLICY)),
        outbox=outbox,
        marks=DirtyMarks(),
        session=session,
        metrics=Metrics(),
        clock=lambda: store.time() + 120,  # the window ended a minute ago
        directory=CustomerDirectory(store.customers),
        held_back=lambda: journal.voiding,
    )


async def summaries(store: RedisStore) -> int:
    return int(await store.client.hlen(keys.outbox("acme")))


async def test_this_process_closes_a_customer_only_once_its_void_has_merged(
    store: RedisStore, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    outbox = Outbox(store.client)
    journal = Journal(tmp_path / "journal")
    await record(store, "acme", ("requests", "search", 1))
    await outbox.mark_dirty({"acme": 0})
    journal.void("acme", CALL, store.time())
    pusher = pusher_for(store, outbox, session, tmp_path, journal)
    await pusher.cycle()
    assert await summaries(store) == 0, "held back while the void waits"
    assert await journal.replay(store.replay) == 1
    await pusher.cycle()
    assert await summaries(store) == 0, "due again a cycle later"
    pusher.clock = lambda: store.time() + 121
    await pusher.cycle()
    assert await summaries(store) == 1, "closed once the void merged"


async def test_a_void_fence_in_the_store_keeps_every_replica_from_closing(store: RedisStore) -> None:
    outbox = Outbox(store.client)
    window = await record(store, "acme", ("requests", "search", 1))
    await store.client.sadd(keys.void_fence("acme"), fence_member(CALL))
    assert await outbox.close("acme", "p", 60, window + 60, AGGREGATIONS) == (FENCED, None)
    await store.client.srem(keys.void_fence("acme"), fence_member(CALL))
    assert (await outbox.close("acme", "p", 60, window + 60, AGGREGATIONS))[0] == 1


async def test_a_void_is_fenced_while_its_call_may_still_run_or_has_a_record(store: RedisStore) -> None:
    outbox = Outbox(store.client)
    running = UnansweredCall(CALL.token, 1, int((store.time() + 30) * 1_000_000))
    assert await outbox.fence("acme", running, 30), "its deadline has not passed: it may still run"
    ran = UnansweredCall(CALL.token, 2)
    await store.client.rpush(keys.call_records("acme", CALL.token), "2 {}")
    assert await outbox.fence("acme", ran, 30), "its record says it ran: the undo is to come"
    assert await store.client.smembers(keys.void_fence("acme")) == {
        b"c0ffee0123456789:1",
        b"c0ffee0123456789:2",
    }
    assert 0 < await store.client.ttl(keys.void_fence("acme")) <= 30


async def test_a_void_with_nothing_to_undo_fences_nothing_and_is_settled(
    store: RedisStore, tmp_path: Path
) -> None:
    outbox = Outbox(store.client)
    journal = Journal(tmp_path / "journal")
    journal.void("acme", CALL, store.time())  # deadline 0: passed; and no record: it never ran
    await fence_voids(outbox, journal)
    assert journal.voids == set()
    assert not await store.client.exists(keys.void_fence("acme"))


async def test_the_journals_voids_are_fenced_until_they_merge(store: RedisStore, tmp_path: Path) -> None:
    outbox = Outbox(store.client)
    journal = Journal(tmp_path / "journal")
    await store.client.rpush(keys.call_records("acme", CALL.token), "1 {}")  # the call ran
    journal.void("acme", CALL, store.time())
    await fence_voids(outbox, journal)
    assert await store.client.smembers(keys.void_fence("acme")) == {fence_member(CALL).encode()}
    assert await journal.replay(store.replay) == 1
    assert journal.voids == set()
    assert not await store.client.exists(keys.void_fence("acme")), "void.lua took the fence with it"


async def test_closes_wait_a_few_seconds_after_the_store_was_down(
    store: RedisStore, session: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pusher_module, "CLOSE_SETTLE_SECONDS", 0.3)
    outbox = OutboxDownOnce(store.client)
    await record(store, "acme", ("requests", "search", 1))
    await outbox.mark_dirty({"acme": 0})
    pusher = pusher_for(store, outbox, session, tmp_path, Journal(tmp_path / "journal"))
    outbox.down = True
    await pusher.cycle()  # the store is down
    await pusher.cycle()
    assert await summaries(store) == 0, "journals that lost replies are writing their fences"
    await asyncio.sleep(0.35)
    await pusher.cycle()
    assert await summaries(store) == 1


class OutboxWithOneMasterDown(Outbox):
    """An outbox whose store calls for the customer "down" fail, as when its master is down."""

    async def fence(self, customer: str, void: UnansweredCall, seconds: int) -> bool:
        if customer == "down":
            raise StoreUnavailable("that master is down")
        return await super().fence(customer, void, seconds)


async def test_a_void_whose_master_is_down_does_not_stop_the_fences_of_the_others(
    store: RedisStore, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal")
    for customer in ("down", "acme"):
        journal.void(customer, UnansweredCall(CALL.token, 1, int((store.time() + 30) * 1_000_000)), 0)
    await fence_voids(OutboxWithOneMasterDown(store.client), journal)
    assert await store.client.exists(keys.void_fence("acme"))
    assert journal.voiding == {"down", "acme"}, "kept, to be fenced once that master answers"
