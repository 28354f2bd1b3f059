"""record.lua against a real redis-server: usage records counted once per key, at their own
time, an enforced one all or nothing; a batch in one round trip; the journal merging a record."""

from __future__ import annotations

import asyncio
import hashlib

import redis.asyncio as aioredis

from sidecar.config.policy.model import Limit
from sidecar.config.policy.windows import Period, calendar_window
from sidecar.store.port import (
    CreditCharge,
    Dedupe,
    Grant,
    LimitCharge,
    MeterRequest,
    RecordOutcome,
    Replayed,
    UsageCharge,
    UsageEntry,
    UsageRecord,
)
from sidecar.store.redis import keys
from sidecar.store.redis.records import Shapes, record_call
from sidecar.store.redis.store import RedisStore
from tests.topologies import all_topologies

DAY = 86400
HOUR_OF_DEDUPE = 3600


def key(name: str) -> bytes:
    return hashlib.sha1(name.encode()).digest()[:12]


def quota(limit: int, period: Period, at: float, amount: int, *, enforced: bool = True) -> LimitCharge:
    return LimitCharge(
        Limit(meter="gpu", limit=limit, period=period), amount, calendar_window(period, at), enforced
    )


def record(
    name: str,
    at: float,
    *limits: LimitCharge,
    amount: int = 1,
    customer: str = "acme",
    enforce: bool = False,
    credits: tuple[CreditCharge, ...] = (),
) -> UsageRecord:
    usage = (UsageCharge("gpu", "", amount, "+"),)
    request = MeterRequest(customer, limits, usage, 60, credits)
    return UsageRecord(Dedupe(key(name), HOUR_OF_DEDUPE), at, request, enforce)


async def counter(store: RedisStore, limit: LimitCharge, customer: str = "acme") -> int:
    assert limit.window is not None
    value = await store.client.get(keys.quota(customer, limit.limit.name, limit.window[0]))
    return int(value or 0)


async def usage(store: RedisStore, customer: str = "acme") -> dict[str, int]:
    fields = await store.client.hgetall(keys.usage(customer))
    return {k.decode(): int(v) for k, v in fields.items()}


async def dumps(client: aioredis.Redis) -> dict[bytes, bytes | None]:
    return {name: await client.dump(name) for name in await client.keys("*")}


async def test_a_record_charges_its_quota_and_billing_window_once_per_key(store: RedisStore) -> None:
    now = store.time()
    month = quota(1000, Period.MONTH, now, 7)
    first = await store.record([record("job-1", now, month, amount=7)])
    again = await store.record([record("job-1", now, month, amount=7)])
    assert [r.outcome for r in first + again] == [RecordOutcome.ACCEPTED, RecordOutcome.DUPLICATE]
    assert await counter(store, month) == 7
    window = int(now) - int(now) % 60
    assert await usage(store) == {f"{window}|gpu|": 7}


async def test_a_record_from_yesterday_charges_yesterdays_window_and_its_billing_window(
    store: RedisStore,
) -> None:
    now = store.time()
    yesterday = now - DAY
    day_then, day_now = quota(10, Period.DAY, yesterday, 4), quota(10, Period.DAY, now, 4)
    [result] = await store.record([record("late", yesterday, day_then, amount=4)])
    assert result.outcome is RecordOutcome.ACCEPTED
    assert (await counter(store, day_then), await counter(store, day_now)) == (4, 0)
    window = int(yesterday) - int(yesterday) % 60
    assert await usage(store) == {f"{window}|gpu|": 4}


async def test_an_enforced_record_without_room_writes_nothing_and_is_not_remembered(
    store: RedisStore,
) -> None:
    now = store.time()
    month = quota(10, Period.MONTH, now, 8)
    await store.record([record("a", now, month, amount=8)])
    before = await dumps(store.client)
    [refused] = await store.record(
        [record("b", now, quota(10, Period.MONTH, now, 3), amount=3, enforce=True)]
    )
    assert refused.outcome is RecordOutcome.REFUSED
    assert [(s.used, s.over, s.charge.limit.name) for s in refused.limits] == [(8, True, "gpu-month")]
    assert await dumps(store.client) == before  # byte for byte, the dedupe set included
    [fits] = await store.record([record("b", now, quota(10, Period.MONTH, now, 2), amount=2, enforce=True)])
    assert fits.outcome is RecordOutcome.ACCEPTED  # the same id, refused before, counts once it fits
    assert await counter(store, month) == 10


async def test_a_record_that_is_not_enforced_is_counted_past_its_limit(store: RedisStore) -> None:
    now = store.time()
    results = await store.record(
        [record(f"r{i}", now, quota(3, Period.MONTH, now, 2), amount=2) for i in range(3)]
    )
    assert [r.outcome for r in results] == [RecordOutcome.ACCEPTED] * 3
    assert await counter(store, quota(3, Period.MONTH, now, 2)) == 6


async def test_a_batch_of_many_customers_is_one_round_trip_of_few_calls_answered_in_order(
    store: RedisStore,
) -> None:
    now = store.time()
    await store.connect()
    batch = [
        record(f"id-{i}", now, quota(100, Period.MONTH, now, 1), customer=f"c{i % 7}") for i in range(100)
    ]
    batch.append(record("id-3", now, quota(100, Period.MONTH, now, 1), customer="c3"))  # c3 already has id-3
    trips, calls = store.batcher.round_trips, store.batcher.calls
    results = await store.record(batch)
    # The first call is written at once on the idle connection (pipeline.py), the second in the
    # turn's batch: a round trip each, and never one per record.
    assert store.batcher.round_trips - trips == 2
    assert store.batcher.calls - calls == 2  # one server: 100 records a call (RECORDS_PER_CALL)
    assert [r.outcome for r in results] == [RecordOutcome.ACCEPTED] * 100 + [RecordOutcome.DUPLICATE]
    assert sum([await counter(store, quota(100, Period.MONTH, now, 1), f"c{i}") for i in range(7)]) == 100


async def test_a_customers_records_of_one_shape_carry_its_keys_once(store: RedisStore) -> None:
    now = store.time()
    month = quota(1000, Period.MONTH, now, 1)
    shared = record("s-0", now, month).request  # admission builds one request per day and amount
    batch = [UsageRecord(Dedupe(key(f"s-{i}"), HOUR_OF_DEDUPE), now, shared) for i in range(100)]
    command = record_call(store._record.sha, batch, Shapes())
    assert command.count(keys.quota("acme", "gpu-month", month.window[0]).encode()) == 1  # type: ignore[index]
    results = await store.record(batch)
    assert [r.outcome for r in results] == [RecordOutcome.ACCEPTED] * 100
    assert await counter(store, month) == 100


@all_topologies
async def test_a_batch_over_many_customers_counts_each_record_once_on_every_topology(
    store: RedisStore,
) -> None:
    """In a cluster a call carries the records of one slot only (each call touches one)."""
    now = store.time()
    month = quota(1000, Period.MONTH, now, 1)
    batch = [record(f"t-{i}", now, month, customer=f"c{i % 50}") for i in range(200)]
    assert [r.outcome for r in await store.record(batch)] == [RecordOutcome.ACCEPTED] * 200
    assert [r.outcome for r in await store.record(batch)] == [RecordOutcome.DUPLICATE] * 200
    assert sum([await counter(store, month, f"c{i}") for i in range(50)]) == 200


async def test_the_same_id_for_two_customers_counts_for_each(store: RedisStore) -> None:
    now = store.time()
    results = await store.record([record("x", now, customer="acme"), record("x", now, customer="bob")])
    assert [r.outcome for r in results] == [RecordOutcome.ACCEPTED] * 2


async def test_concurrent_enforced_records_admit_exactly_the_quota(store: RedisStore) -> None:
    now = store.time()
    calls = [
        store.record([record(f"e{i}", now, quota(25, Period.MONTH, now, 1), enforce=True)]) for i in range(60)
    ]
    results = [r for batch in await asyncio.gather(*calls) for r in batch]
    assert sum(r.outcome is RecordOutcome.ACCEPTED for r in results) == 25
    assert await counter(store, quota(25, Period.MONTH, now, 1)) == 25


async def test_a_record_draws_prepaid_credit_after_its_allowance(store: RedisStore) -> None:
    now = store.time()
    await store.grant("acme", Grant(id="g", meter="gpu", amount=100))
    allowance = LimitCharge(
        Limit(meter="gpu", limit=10, period=Period.MONTH),
        30,
        calendar_window(Period.MONTH, now),
        False,
        False,
        True,
    )
    credit = CreditCharge("gpu", 30, True, (0,))
    [result] = await store.record([record("c1", now, allowance, amount=30, credits=(credit,))])
    assert result.outcome is RecordOutcome.ACCEPTED
    state = (await store.read_limits(MeterRequest("acme", (allowance,), (), 60, (credit,)))).credits[0]
    assert (state.granted, state.balance) == (100, 80)  # 10 from the allowance, 20 from the grant


async def test_an_enforced_record_beyond_its_credit_is_refused(store: RedisStore) -> None:
    now = store.time()
    await store.grant("acme", Grant(id="g", meter="gpu", amount=5))
    credit = CreditCharge("gpu", 6, True)
    [result] = await store.record([record("c1", now, amount=6, credits=(credit,), enforce=True)])
    assert result.outcome is RecordOutcome.REFUSED
    assert result.credits[0].over and result.credits[0].balance == 5


async def test_an_id_is_remembered_in_its_bucket_until_the_next_bucket_ends(store: RedisStore) -> None:
    now = store.time()
    await store.record([record("kept", now)])
    bucket = int(store.time()) // HOUR_OF_DEDUPE
    seen = keys.records_seen("acme", bucket)
    assert await store.client.sismember(seen, key("kept"))
    expected = (bucket + 2) * HOUR_OF_DEDUPE - store.time()  # EXPIRETIME is Redis 7; TTL is 6.2's
    assert abs(await store.client.ttl(seen) - expected) <= 2


async def test_an_id_in_the_previous_bucket_is_still_a_duplicate(store: RedisStore) -> None:
    now = store.time()
    bucket = int(now) // HOUR_OF_DEDUPE
    await store.client.sadd(keys.records_seen("acme", bucket - 1), key("earlier"))
    [result] = await store.record([record("earlier", now)])
    assert result.outcome is RecordOutcome.DUPLICATE


async def test_a_remembered_id_costs_under_80_bytes(store: RedisStore) -> None:
    now = store.time()
    for start in range(0, 20_000, 1000):
        await store.record([record(f"m{i}", now) for i in range(start, start + 1000)])
    seen = keys.records_seen("acme", int(store.time()) // HOUR_OF_DEDUPE)
    size = await store.client.memory_usage(seen, samples=0)
    assert await store.client.scard(seen) == 20_000
    print(f"memory per remembered id: {size / 20_000:.1f} bytes")
    assert size / 20_000 < 80  # 71 on Redis 6.2: a set entry, its 12-byte member, the table slot


async def test_a_journaled_record_merges_once_even_when_it_reached_the_store_meanwhile(
    store: RedisStore,
) -> None:
    now = store.time()
    month = quota(100, Period.MONTH, now, 5)
    kept = record("retried", now, month, amount=5)
    entry = UsageEntry("entry-1", kept.at, kept.request, dedupe=kept.dedupe)
    await store.record([kept])  # the emitter sent it again to another replica, which counted it
    assert await store.replay(entry) is Replayed.REPEATED
    assert await counter(store, month) == 5
    fresh = record("journaled-only", now, month, amount=5)
    assert (
        await store.replay(UsageEntry("entry-2", fresh.at, fresh.request, dedupe=fresh.dedupe))
        is Replayed.MERGED
    )
    assert (
        await store.replay(UsageEntry("entry-3", fresh.at, fresh.request, dedupe=fresh.dedupe))
        is Replayed.REPEATED
    )
    assert await counter(store, month) == 10


async def test_every_key_a_record_writes_is_the_customers(store: RedisStore) -> None:
    now = store.time()
    await store.record([record("k", now, quota(10, Period.MONTH, now, 1))])
    written = [name.decode() for name in await store.client.keys("*")]
    assert written and all(name.startswith(keys.customer_tag("acme")) for name in written)
