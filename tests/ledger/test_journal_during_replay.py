"""Entries recorded while the journal is being merged must still reach the disk every
FLUSH_INTERVAL: the README promises that a crash loses at most the last 100 ms of them.

Found by the soak (bench/soak.py): one SIGKILL of a sidecar lost about 400 requests admitted
through the journal (they were answered 200, and never billed). The merge loop in server.py
flushes only between merges, and a merge runs one store round trip per entry; under load (where
store timeouts keep the journal in use outside outages too) a merge takes seconds, and everything
recorded meanwhile stays in memory. Here a store that takes 2 s per entry makes that
deterministic. Fixed: the writing runs in a task of its own beside the merges (ledger/merger.py,
run_ledger).
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

from sidecar.errors import UnansweredCall
from sidecar.ledger.journal import FLUSH_INTERVAL, SEGMENT_SUFFIX, Journal
from sidecar.ledger.merger import MERGE_INTERVAL, Merger, run_ledger
from sidecar.metrics import Metrics
from sidecar.store.port import JournalEntry, Replayed
from tests.helpers import request_at

SLOW_MERGE_SECONDS = 2.0


class SlowStore:
    """Takes SLOW_MERGE_SECONDS to merge each journal entry, as a store under load adds up to."""

    def __init__(self) -> None:
        self.merging = asyncio.Event()
        self.merged = asyncio.Event()

    async def replay(self, entry: JournalEntry) -> Replayed:
        self.merging.set()
        await asyncio.sleep(SLOW_MERGE_SECONDS)
        self.merged.set()
        return Replayed.MERGED


class NoVoids:
    async def fence(self, customer: str, void: UnansweredCall, seconds: int) -> bool:
        raise AssertionError("this journal keeps no voids")


def on_disk(directory: Path) -> str:
    return "".join(path.read_text() for path in directory.glob(f"*{SEGMENT_SUFFIX}"))


async def test_an_entry_recorded_during_a_slow_merge_is_on_disk_within_a_few_flush_intervals(
    tmp_path: Path,
) -> None:
    store = SlowStore()
    journal = Journal(tmp_path / "journal")
    journal.record(request_at(0.0, "first"), 0.0)
    async with AsyncExitStack() as stack:
        await run_ledger(stack, Merger(journal, store, Metrics(), lambda _, __: None), fences=NoVoids())
        await asyncio.wait_for(store.merging.wait(), MERGE_INTERVAL + 1)
        journal.record(request_at(0.0, "second"), 0.0)
        await asyncio.sleep(5 * FLUSH_INTERVAL)
        assert '"customer": "second"' in on_disk(tmp_path / "journal")
        await asyncio.wait_for(store.merged.wait(), SLOW_MERGE_SECONDS)  # stop between merges
