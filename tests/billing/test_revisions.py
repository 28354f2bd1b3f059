"""Revisions of a closed window, which make an amended summary's id new: kept per day and
expiring, not in one hash that grew with every window a customer ever closed (close.lua)."""

from __future__ import annotations

from sidecar.store.redis import keys
from sidecar.store.redis.store import RedisStore
from sidecar.store.summaries import summary_id
from tests.billing.test_outbox import AGGREGATIONS, record

DAY = 86400
KEPT = 40 * DAY  # close.lua REVISIONS_KEPT


async def test_revisions_live_in_a_hash_of_their_day_that_expires(store: RedisStore) -> None:
    window = await record(store, "acme", ("requests", "search", 5))
    await store.outbox.close("acme", "pro", 60, window + 60, AGGREGATIONS)
    day = window - window % DAY
    name = f"{window}|requests|search"
    assert await store.client.hget(keys.revision_day("acme", day), name) == b"1"
    assert not await store.client.exists(keys.revisions("acme")), "the unbounded hash is no longer written"
    seconds_left = await store.client.ttl(keys.revision_day("acme", day))  # Redis 6.2: no EXPIRETIME
    assert abs(store.time() + seconds_left - (day + DAY + KEPT)) <= 2


async def test_a_window_closed_by_the_release_before_goes_on_from_its_revision(store: RedisStore) -> None:
    window = await record(store, "acme", ("requests", "search", 2))
    await store.client.hset(keys.revisions("acme"), f"{window}|requests|search", 3)  # closed three times
    await store.outbox.close("acme", "pro", 60, window + 60, AGGREGATIONS)
    (summary,) = await store.outbox.summaries("acme")
    assert summary.id == summary_id("acme", "requests", "search", window, 4), "never a used id again"
