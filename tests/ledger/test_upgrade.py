"""A journal segment written by the release before the typed entry still merges after the upgrade.

tests/fixtures/journal/v1.journal was written by that release's journal (its README says how):
an admission kept under store_failure: open, a response charge whose reply was lost (call 7),
and a void (call 9), for customer acme in June 2099. Merged here into a real redis-server.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sidecar.ledger.journal import Journal
from sidecar.store.redis import keys
from sidecar.store.redis.store import RedisStore
from tests.store.test_call_records import searches, send_named
from tests.store.test_check_and_meter import month_charge, request_for

SEGMENT = Path(__file__).parent.parent / "fixtures" / "journal" / "v1.journal"
TOKEN = "c0ffee0123456789"
MONTH = keys.quota("acme", "requests-month", 4083955200)  # June 2099
DAY = keys.quota("acme", "egress-day-export", 4085251200)  # 2099-06-15
MINUTE = 4085323200  # the billing window (60 s) of the entries


def journal_with_the_old_segment(directory: Path) -> Journal:
    directory.mkdir()
    shutil.copy(SEGMENT, directory / SEGMENT.name)
    return Journal(directory)


async def counters(store: RedisStore) -> tuple[int, int, dict[bytes, bytes]]:
    month = int(await store.client.get(MONTH) or 0)
    day = int(await store.client.get(DAY) or 0)
    return month, day, await store.client.hgetall(keys.usage("acme"))


async def test_an_old_segment_merges_every_entry_once(store: RedisStore, tmp_path: Path) -> None:
    journal = journal_with_the_old_segment(tmp_path / "journal")
    assert await journal.replay(store.replay) == 3
    assert await counters(store) == (
        1,
        250,
        {f"{MINUTE}|requests|search".encode(): b"1", f"{MINUTE}|egress|export".encode(): b"250"},
    )
    assert not await store.client.exists(keys.rate_log("acme", "requests-second")), "its window has passed"
    assert list((tmp_path / "journal").iterdir()) == []


async def test_an_old_entry_whose_call_ran_is_not_merged_again(store: RedisStore, tmp_path: Path) -> None:
    await store.client.rpush(keys.call_records("acme", TOKEN), "7 []")  # call 7 ran, its reply lost
    journal = journal_with_the_old_segment(tmp_path / "journal")
    assert await journal.replay(store.replay) == 3
    month, day, _ = await counters(store)
    assert (month, day) == (1, 0)


async def test_a_merged_old_segment_merged_again_counts_once(store: RedisStore, tmp_path: Path) -> None:
    await journal_with_the_old_segment(tmp_path / "first").replay(store.replay)
    await journal_with_the_old_segment(tmp_path / "again").replay(store.replay)
    month, day, _ = await counters(store)
    assert (month, day) == (1, 250)


async def test_an_old_void_undoes_the_call_it_names(store: RedisStore, tmp_path: Path) -> None:
    request = request_for(month_charge(10, now=store.time()), usage=searches())
    await send_named(store, request, 9)  # call 9 ran: its request was answered 503
    assert (await store.read_limits(request)).limits[0].used == 1
    await journal_with_the_old_segment(tmp_path / "journal").replay(store.replay)
    assert (await store.read_limits(request)).limits[0].used == 0
