"""The outbox scripts against a real redis-server: close, lease, settle, dead letters, re-drive."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime

import pytest

from sidecar.config.policy.windows import Period, calendar_window
from sidecar.store.port import MeterRequest, UsageCharge
from sidecar.store.redis import keys
from sidecar.store.redis.outbox import Outbox
from sidecar.store.redis.store import RedisStore
from sidecar.store.summaries import summary_id

AGGREGATIONS = {"requests": "count", "tokens": "sum"}


@pytest.fixture
async def outbox(store: RedisStore) -> AsyncIterator[Outbox]:
    yield store.outbox  # the store's own, on its one client


async def record(store: RedisStore, customer: str, *usage: tuple[str, str, int]) -> int:
    """Record usage now; returns the billing window (interval 60) it landed in."""
    charges = tuple(UsageCharge(meter, feature, amount, "+") for meter, feature, amount in usage)
    admission = await store.charge(MeterRequest(customer, (), charges, 60))
    return int(admission.store_time) // 60 * 60


async def test_close_moves_finished_windows_into_the_outbox_with_deterministic_ids(
    store: RedisStore, outbox: Outbox
) -> None:
    window = await record(store, "acme", ("requests", "search", 3), ("tokens", "complete", 120))
    moved, open_window = await outbox.close("acme", "pro", 60, window + 60, AGGREGATIONS)
    assert (moved, open_window) == (2, None)
    summaries = {s.meter: s for s in await outbox.summaries("acme")}
    assert summaries["requests"].id == summary_id("acme", "requests", "search", window, 1)
    assert (summaries["requests"].value, summaries["requests"].aggregation) == (3, "count")
    assert (summaries["tokens"].value, summaries["tokens"].plan) == (120, "pro")
    assert (summaries["tokens"].window_start, summaries["tokens"].window_end) == (window, window + 60)
    assert await store.client.hlen(keys.usage("acme")) == 0


async def test_open_windows_stay_and_report_the_earliest(store: RedisStore, outbox: Outbox) -> None:
    window = await record(store, "acme", ("requests", "search", 1))
    assert await outbox.close("acme", "pro", 60, window + 59, AGGREGATIONS) == (0, window)
    assert await outbox.summaries("acme") == []


async def test_units_after_a_close_become_an_amended_summary_with_a_new_id(
    store: RedisStore, outbox: Outbox
) -> None:
    window = await record(store, "acme", ("requests", "search", 5))
    await outbox.close("acme", "pro", 60, window + 60, AGGREGATIONS)
    await store.client.hincrby(keys.usage("acme"), f"{window}|requests|search", 2)  # a late unit
    await outbox.close("acme", "pro", 60, window + 60, AGGREGATIONS)
    values = {s.id: s.value for s in await outbox.summaries("acme")}
    assert values == {
        summary_id("acme", "requests", "search", window, 1): 5,
        summary_id("acme", "requests", "search", window, 2): 2,
    }


async def test_acknowledged_summaries_are_deleted_and_the_rest_remain(
    store: RedisStore, outbox: Outbox
) -> None:
    window = await record(store, "acme", ("requests", "a", 1), ("requests", "b", 1))
    await outbox.close("acme", "pro", 60, window + 60, AGGREGATIONS)
    first = (await outbox.summaries("acme"))[0]
    assert await outbox.settle("acme", (first.id,)) == 1
    assert [s.id for s in await outbox.summaries("acme")] != [first.id]


async def test_dead_letters_keep_the_summary_and_reason_and_redrive_restores_it_unchanged(
    store: RedisStore, outbox: Outbox
) -> None:
    window = await record(store, "acme", ("requests", "search", 4))
    await outbox.close("acme", "pro", 60, window + 60, AGGREGATIONS)
    (summary,) = await outbox.summaries("acme")
    assert await outbox.settle("acme", (summary.id,), dead_reason="400: bad meter") == 0
    (letter,) = await outbox.dead_letters()
    assert letter == {
        "summary": summary.to_json() | {"window_start": window, "window_end": window + 60},
        "reason": "400: bad meter",
    }
    assert await outbox.redrive(now_ms=1) == 1
    assert await outbox.summaries("acme") == [summary]
    assert await outbox.dead_letters() == []
    assert await store.client.zscore(keys.PENDING, "acme") == 1


async def test_a_lease_keeps_other_replicas_off_until_it_ends(outbox: Outbox) -> None:
    await outbox.schedule_push("acme", 1_000)
    assert await outbox.claim_pending(now_ms=2_000, lease_end_ms=32_000, limit=10) == ["acme"]
    assert await outbox.claim_pending(now_ms=3_000, lease_end_ms=33_000, limit=10) == []
    assert await outbox.claim_pending(now_ms=32_000, lease_end_ms=62_000, limit=10) == ["acme"]


async def test_release_only_acts_when_nobody_rescheduled_meanwhile(outbox: Outbox) -> None:
    await outbox.schedule_push("acme", 1_000)
    await outbox.claim_pending(now_ms=2_000, lease_end_ms=32_000, limit=10)
    await outbox.schedule_push("acme", 2_500)  # new summaries arrived during the push
    assert await outbox.reschedule(keys.PENDING, "acme", 32_000, None) is False
    assert await outbox.claim_pending(now_ms=3_000, lease_end_ms=33_000, limit=10) == ["acme"]
    assert await outbox.reschedule(keys.PENDING, "acme", 33_000, None) is True
    assert await outbox.claim_pending(now_ms=99_000, lease_end_ms=129_000, limit=10) == []


async def test_dirty_marks_keep_the_earliest_due_time(outbox: Outbox) -> None:
    await outbox.mark_dirty({"acme": 5_000})
    await outbox.mark_dirty({"acme": 9_000, "bob": 7_000})
    await outbox.mark_dirty({"acme": 4_000})
    assert await outbox.due_dirty(now_ms=10_000, limit=10) == [("acme", 4_000), ("bob", 7_000)]


async def test_rebuild_finds_usage_and_outboxes_the_schedules_lost(store: RedisStore, outbox: Outbox) -> None:
    window = await record(store, "acme", ("requests", "search", 1))
    await record(store, "bob", ("requests", "search", 1))
    await outbox.close("acme", "pro", 60, window + 60, AGGREGATIONS)
    await outbox.rebuild_schedules()
    assert [c for c, _ in await outbox.due_dirty(now_ms=0, limit=10)] == ["bob"]
    assert await outbox.claim_pending(now_ms=0, lease_end_ms=1, limit=10) == ["acme"]


async def test_a_unique_meter_closes_into_the_count_of_distinct_values_per_window(
    store: RedisStore, outbox: Outbox
) -> None:
    for user in ("ann", "bo", "ann", "cy", "bo"):
        admission = await store.charge(
            MeterRequest("acme", (), (UsageCharge("users", "search", 1, "uniq", user),), 60)
        )
    window = int(admission.store_time) // 60 * 60
    await outbox.close("acme", "pro", 60, window + 60, {"users": "unique"})
    (summary,) = await outbox.summaries("acme")
    assert (summary.value, summary.aggregation) == (3, "unique")
    assert summary.id == summary_id("acme", "users", "search", window, 1)
    assert await store.client.hlen(keys.usage("acme")) == 0


# -- unique meters: first sightings in the billing month (SPEC §6) ------------------------------

MARCH = int(datetime(2026, 3, 2, 9, 0, tzinfo=UTC).timestamp())
UNIQUE = {"users": "unique"}


async def see(
    store: RedisStore, window: int, user: str, feature: str = "search", customer: str = "acme"
) -> None:
    """One request of `user` recorded in `window`, as lib.lua record_usage writes it."""
    await store.client.hincrby(keys.usage(customer), f"u|{window}|users|{feature}|{user}", 1)


async def billed(outbox: Outbox, customer: str = "acme") -> dict[int, int]:
    """window start → units billed, over every summary in the outbox."""
    totals: dict[int, int] = {}
    for summary in await outbox.summaries(customer):
        totals[summary.window_start] = totals.get(summary.window_start, 0) + summary.value
    return totals


async def close_all(outbox: Outbox, cutoff: int, anchor_day: int = 1) -> int:
    moved, _ = await outbox.close("acme", "pro", 60, cutoff, UNIQUE, anchor_day=anchor_day)
    return moved


async def test_one_user_active_in_three_windows_of_a_month_is_billed_once(
    store: RedisStore, outbox: Outbox
) -> None:
    windows = [MARCH, MARCH + 3600, MARCH + 9 * 86400]
    for window in windows:
        await see(store, window, "ann")
    await see(store, windows[1], "bo")
    await see(store, windows[2], "bo")
    assert await close_all(outbox, windows[2] + 60) == 2
    assert await billed(outbox) == {windows[0]: 1, windows[1]: 1}  # ann, then bo: the month's 2


async def test_windows_closed_one_by_one_bill_each_value_once_a_month(
    store: RedisStore, outbox: Outbox
) -> None:
    windows = [MARCH + n * 60 for n in range(3)]
    for window in windows:
        await see(store, window, "ann")
        await see(store, window, f"new-{window}")
        await close_all(outbox, window + 60)
    assert await billed(outbox) == {windows[0]: 2, windows[1]: 1, windows[2]: 1}


async def test_a_window_with_no_first_sighting_makes_no_summary(store: RedisStore, outbox: Outbox) -> None:
    await see(store, MARCH, "ann")
    await close_all(outbox, MARCH + 60)
    await see(store, MARCH + 60, "ann")
    assert await close_all(outbox, MARCH + 120) == 0
    assert len(await outbox.summaries("acme")) == 1
    assert await store.client.hlen(keys.usage("acme")) == 0


async def test_a_value_is_billed_once_a_month_whatever_the_feature(store: RedisStore, outbox: Outbox) -> None:
    await see(store, MARCH, "ann", feature="search")
    await see(store, MARCH, "ann", feature="export")
    await see(store, MARCH + 60, "ann", feature="export")
    await close_all(outbox, MARCH + 120)
    assert sum((await billed(outbox)).values()) == 1


@pytest.mark.parametrize(
    "anchor_day, first, second, times",
    [
        pytest.param(1, datetime(2026, 2, 27), datetime(2026, 3, 2), 2, id="calendar-months"),
        pytest.param(1, datetime(2026, 3, 1), datetime(2026, 3, 31, 23, 59), 1, id="one-calendar-month"),
        pytest.param(15, datetime(2026, 3, 14, 23, 59), datetime(2026, 3, 15), 2, id="anchor-15-boundary"),
        pytest.param(15, datetime(2026, 3, 15), datetime(2026, 4, 14, 23, 59), 1, id="anchor-15-month"),
        pytest.param(31, datetime(2026, 2, 28), datetime(2026, 3, 30), 1, id="anchor-31-short-february"),
        pytest.param(31, datetime(2026, 2, 27), datetime(2026, 2, 28), 2, id="anchor-31-moves-to-feb-28"),
        pytest.param(30, datetime(2028, 2, 28), datetime(2028, 2, 29), 2, id="anchor-30-leap-year"),
    ],
)
async def test_the_billing_month_follows_the_customers_anchor(
    store: RedisStore, outbox: Outbox, anchor_day: int, first: datetime, second: datetime, times: int
) -> None:
    windows = [int(moment.replace(tzinfo=UTC).timestamp()) // 60 * 60 for moment in (first, second)]
    for window in windows:
        await see(store, window, "ann")
    await close_all(outbox, windows[1] + 60, anchor_day)
    assert sum((await billed(outbox)).values()) == times


async def test_close_lua_months_are_those_of_windows_py(store: RedisStore, outbox: Outbox) -> None:
    """close.lua's calendar against config/policy/windows.py, over moments from 1999 to 2101: the
    set of first sightings is named by its month's start and kept 7 days past its end (or past
    now, for a month already over)."""
    chooser = random.Random(15)
    for _ in range(60):
        moment = chooser.randrange(915_148_800, 4_133_980_800) // 60 * 60
        anchor = chooser.choice([1, 2, 15, 28, 29, 30, 31])
        await store.client.flushdb()
        await see(store, moment, "ann")
        await close_all(outbox, moment + 60, anchor)
        start, end = calendar_window(Period.MONTH, moment, date(2026, 1, anchor))
        seen = keys.first_seen("acme", "users", start)
        now = int(store.time())
        ttl = await store.client.ttl(seen)
        assert abs(ttl - (max(end, now) + 7 * 86400 - now)) <= 2, (moment, anchor)


async def test_first_sightings_keep_a_fixed_size_digest_per_value(store: RedisStore, outbox: Outbox) -> None:
    value = "a-rather-long-user-identifier@example.com"
    await see(store, MARCH, value)
    await close_all(outbox, MARCH + 60)
    start, _ = calendar_window(Period.MONTH, MARCH)
    members = await store.client.smembers(keys.first_seen("acme", "users", start))
    assert members == {hashlib.sha1(value.encode()).hexdigest()[:16].encode()}
