"""Usage history kept by close.lua as it closes summaries, read by store/redis/history.py, on a real
redis-server: one field per (window, meter, feature) in one hash a day, amended windows added up
(max and min keep the extreme), each day's hash expiring history_days after the day ends."""

from __future__ import annotations

from sidecar.store.history import DAY, HOUR, HistoryWindow
from sidecar.store.port import MeterRequest, UsageCharge
from sidecar.store.redis import keys
from sidecar.store.redis.store import RedisStore
from tests.helpers import month_charge

CUSTOMER = "acme"
AGGREGATIONS = {"requests": "count", "peak": "max"}


def usage(now: float, *charges: UsageCharge) -> MeterRequest:
    return MeterRequest(CUSTOMER, (month_charge(10**9, now=now),), charges, 60)


async def close(store: RedisStore, cutoff: int, history_days: int = 35) -> int:
    moved, _ = await store.outbox.close(CUSTOMER, "pro", 60, cutoff, AGGREGATIONS, history_days=history_days)
    return moved


async def test_closed_summaries_are_kept_per_window_and_read_back(store: RedisStore) -> None:
    await store.check_and_meter(usage(store.time(), UsageCharge("requests", "search", 1, "+")))
    now = int(store.time())
    for _ in range(4):
        await store.check_and_meter(usage(now, UsageCharge("requests", "search", 1, "+")))
    await store.check_and_meter(usage(now, UsageCharge("requests", "export", 3, "+")))
    assert await close(store, now + 120) == 2
    window = now - now % 60
    assert await store.history.windows(CUSTOMER, now - DAY, now + DAY) == [
        HistoryWindow(window, window + 60, "requests", "export", 3),
        HistoryWindow(window, window + 60, "requests", "search", 5),
    ]
    assert await store.history.windows(CUSTOMER, window + 60, now + DAY) == []  # starts outside the range
    assert await store.history.windows("nobody", now - DAY, now + DAY) == []


async def test_an_amended_window_adds_up_and_a_max_meter_keeps_its_peak(store: RedisStore) -> None:
    now = int(store.time()) or 1_767_225_600
    await store.check_and_meter(
        usage(now, UsageCharge("requests", "search", 2, "+"), UsageCharge("peak", "search", 7, "max"))
    )
    await close(store, now + 120)
    await store.check_and_meter(
        usage(now, UsageCharge("requests", "search", 1, "+"), UsageCharge("peak", "search", 4, "max"))
    )
    await close(store, now + 120)  # a late unit of the same window: revision 2, the same history window
    values = {w.meter: w.value for w in await store.history.windows(CUSTOMER, now - DAY, now + DAY)}
    assert values == {"requests": 3, "peak": 7}


async def test_an_hour_of_short_windows_is_one_hash_that_expires_history_days_after_the_hour(
    store: RedisStore,
) -> None:
    now = int(store.time()) or 1_767_225_600
    await store.check_and_meter(usage(now, UsageCharge("requests", "search", 1, "+")))
    await close(store, now + 120, history_days=2)
    hour = now - now % HOUR
    key = keys.history_bucket(CUSTOMER, hour, hourly=True)
    assert await store.client.hgetall(key) == {f"{now - now % 60 - hour}|60|requests|search".encode(): b"1"}
    ttl = await store.client.ttl(key)  # EXPIRETIME needs Redis 7
    assert abs(int(store.time()) + ttl - (hour + HOUR + 2 * DAY)) <= 2
    await store.check_and_meter(usage(now, UsageCharge("requests", "search", 1, "+")))
    await close(store, now + 120, history_days=0)  # none kept: the hour's hash is untouched
    assert [w.value for w in await store.history.windows(CUSTOMER, hour, hour + HOUR)] == [1]


async def test_windows_of_half_an_hour_and_more_are_kept_a_day_a_hash(store: RedisStore) -> None:
    now = int(store.time()) or 1_767_225_600
    request = MeterRequest(
        CUSTOMER, (month_charge(10**9, now=now),), (UsageCharge("requests", "search", 2, "+"),), 3600
    )
    await store.check_and_meter(request)
    await store.outbox.close(CUSTOMER, "pro", 3600, now + 7200, AGGREGATIONS)
    day, window = now - now % DAY, now - now % 3600
    assert await store.client.hgetall(keys.history_bucket(CUSTOMER, day, hourly=False)) == {
        f"{window - day}|3600|requests|search".encode(): b"2"
    }
    assert await store.history.windows(CUSTOMER, day, day + DAY) == [
        HistoryWindow(window, window + 3600, "requests", "search", 2)
    ]
