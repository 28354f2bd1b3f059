"""The local journal against a real redis-server: kept on disk, merged once, at the time it happened."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from sidecar import tasks
from sidecar.errors import StoreUnavailable, UnansweredCall
from sidecar.ledger.journal import MERGE_LANES, SEGMENT_SUFFIX, Journal
from sidecar.store.port import JournalEntry, Replayed
from sidecar.store.redis.embedded import free_port
from sidecar.store.redis.store import RedisStore
from tests.helpers import request_at


async def used(store: RedisStore, now: float) -> int:
    return (await store.read_limits(request_at(now))).limits[0].used


async def test_recorded_usage_is_merged_into_the_counters_and_the_billing_usage(
    store: RedisStore, tmp_path: Path
) -> None:
    now = store.time()
    journal = Journal(tmp_path)
    for _ in range(5):
        journal.record(request_at(now), now)
    assert await journal.replay(store.replay) == 5
    assert await used(store, now) == 5
    usage = await store.client.hgetall("sc:{c:acme}:u")
    window = int(now) - int(now) % 60
    assert usage == {f"{window}|requests|search".encode(): b"5"}
    assert list(tmp_path.glob(f"*{SEGMENT_SUFFIX}")) == []


async def test_an_entry_merged_twice_counts_once(store: RedisStore, tmp_path: Path) -> None:
    now = store.time()
    entries: list[JournalEntry] = []

    async def keep(entry: JournalEntry) -> None:
        entries.append(entry)

    journal = Journal(tmp_path)
    journal.record(request_at(now), now)
    await journal.replay(keep)
    assert [await store.replay(entries[0]) for _ in range(2)] == [Replayed.MERGED, Replayed.REPEATED]
    assert await used(store, now) == 1


async def test_entries_written_before_a_crash_are_merged_after_the_restart(
    store: RedisStore, tmp_path: Path
) -> None:
    now = store.time()
    before = Journal(tmp_path)
    for _ in range(3):
        before.record(request_at(now), now)
    await before.flush()
    before.close()  # what the process's death does to its lock
    after = Journal(tmp_path)
    assert await after.replay(store.replay) == 3
    assert await used(store, now) == 3


async def test_a_segment_another_live_process_writes_is_left_alone(store: RedisStore, tmp_path: Path) -> None:
    now = store.time()
    live = Journal(tmp_path)
    live.record(request_at(now), now)
    await live.flush()
    assert await Journal(tmp_path).replay(store.replay) == 0
    assert await live.replay(store.replay) == 1
    live.close()


async def test_a_store_still_down_keeps_the_segment_for_the_next_attempt(
    store: RedisStore, tmp_path: Path
) -> None:
    now = store.time()
    journal = Journal(tmp_path)
    journal.record(request_at(now), now)

    async def down(entry: JournalEntry) -> None:
        raise StoreUnavailable("down")

    assert await journal.replay(down) == 0
    assert len(list(tmp_path.glob(f"*{SEGMENT_SUFFIX}"))) == 1
    assert await journal.replay(store.replay) == 1
    assert await used(store, now) == 1


async def test_a_line_cut_short_by_a_crash_is_skipped(
    store: RedisStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = store.time()
    journal = Journal(tmp_path)
    journal.record(request_at(now), now)
    await journal.flush()
    journal.close()
    segment = next(tmp_path.glob(f"*{SEGMENT_SUFFIX}"))
    segment.write_text(segment.read_text() + '{"v": 1, "id": "cut')
    assert await Journal(tmp_path).replay(store.replay) == 1
    assert "incomplete" in caplog.text


async def test_entries_kept_because_the_store_is_down_still_count_as_pending(
    store: RedisStore, tmp_path: Path
) -> None:
    now = store.time()
    journal = Journal(tmp_path)
    for _ in range(3):
        journal.record(request_at(now), now)
    assert journal.pending == 3

    async def down(entry: JournalEntry) -> None:
        raise StoreUnavailable("down")

    assert await journal.replay(down) == 0
    assert journal.pending == 3  # in a closed segment now, still waiting for the store
    assert await journal.replay(store.replay) == 3
    assert journal.pending == 0


async def test_a_void_is_voiding_its_customer_until_it_has_merged(store: RedisStore, tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.void("acme", UnansweredCall("c0ffee0123456789", 1), store.time())
    assert journal.voiding == {"acme"}
    assert await journal.replay(store.replay) == 1
    assert journal.voiding == set()


async def test_each_customer_s_entries_merge_in_the_order_they_were_written(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for n in range(60):
        journal.record(request_at(1_000.0, f"c{n % 3}"), 1_000.0 + n)
    chance = random.Random(3)
    seen: dict[str, list[float]] = {}

    async def merge(entry: JournalEntry) -> None:
        await asyncio.sleep(chance.random() / 1000)
        seen.setdefault(entry.customer_id, []).append(entry.at)

    assert await journal.replay(merge) == 60
    assert seen == {f"c{c}": [1_000.0 + n for n in range(c, 60, 3)] for c in range(3)}


async def test_customers_merge_side_by_side_up_to_the_lane_count(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for n in range(MERGE_LANES * 3):
        journal.record(request_at(1_000.0, f"c{n}"), 1_000.0)
    in_flight = most = 0

    async def merge(entry: JournalEntry) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1

    assert await journal.replay(merge) == MERGE_LANES * 3
    assert most == MERGE_LANES


async def test_a_failure_stops_every_lane_and_a_later_merge_counts_each_entry_once(
    store: RedisStore, tmp_path: Path
) -> None:
    now = store.time()
    journal = Journal(tmp_path)
    for n in range(200):
        journal.record(request_at(now, f"c{n % 40}"), now)
    calls = 0

    async def fails_on_the_50th(entry: JournalEntry) -> Replayed:
        nonlocal calls
        calls += 1
        if calls == 50:
            raise StoreUnavailable("down")
        return await store.replay(entry)

    first = await journal.replay(fails_on_the_50th)
    assert 49 <= first < 50 + MERGE_LANES  # lanes already waiting on the store finish their entry
    assert await journal.replay(store.replay) == 200  # the segment again, whole: its markers skip `first`
    for customer in (f"c{c}" for c in range(40)):
        assert (await store.read_limits(request_at(now, customer))).limits[0].used == 5


async def test_no_entry_merges_after_a_merge_was_cancelled(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for n in range(MERGE_LANES * 4):
        journal.record(request_at(1_000.0, f"c{n}"), 1_000.0)
    started = 0

    async def merge(entry: JournalEntry) -> None:
        nonlocal started
        started += 1
        await asyncio.sleep(0.01)

    merging = asyncio.create_task(journal.replay(merge))
    await asyncio.sleep(0.015)
    await tasks.stop(merging)
    begun = started
    await asyncio.sleep(0.05)
    assert started == begun < MERGE_LANES * 4
    assert len(list(tmp_path.glob(f"*{SEGMENT_SUFFIX}"))) == 1  # kept, to merge again


async def test_merges_failing_together_leave_the_circuit_breaker_closed(tmp_path: Path) -> None:
    """They fail on their own; opening the breaker would refuse every request, on every master."""
    nobody = RedisStore.open(f"redis://127.0.0.1:{free_port()}/0", 0.2)
    journal = Journal(tmp_path)
    for n in range(MERGE_LANES):
        journal.record(request_at(1_000.0, f"c{n}"), 1_000.0)
    try:
        assert await journal.replay(nobody.replay) == 0
        assert not nobody.circuit_open
    finally:
        await nobody.close()
