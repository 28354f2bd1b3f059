"""The outbox scripts against a real redis-server: close, lease, settle, dead letters, re-drive."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sidecar.store.port import MeterRequest, UsageCharge
from sidecar.store.redis import keys
from sidecar.store.redis.outbox import Outbox
from sidecar.store.redis.store import RedisStore
from sidecar.store.summaries import summary_id

AGGREGATIONS = {"requests": "count", "tokens": "sum"}


@pytest.fixture
async def outbox(store: RedisStore) -> AsyncIterator[Outbox]:
    yield Outbox(store.client)


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
