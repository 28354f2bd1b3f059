"""The journal's three loops, for the life of the process: write, fence, merge.

Writing puts what was recorded on disk every FLUSH_INTERVAL; it never waits for a merge, since
under load a merge takes seconds, and a crash must lose at most FLUSH_INTERVAL of entries.
Fencing keeps, in the store, the billing windows of the customers this journal has voids for
open in every replica (fence.lua) while a void may have something to undo. Merging hands every
entry to the store's replay once a second (a no-op while the journal is empty), counts what it
found of each lost reply, and marks the customer for billing. On shutdown, once the three have
stopped, the last entries are written, to merge after the restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Protocol

from sidecar import tasks
from sidecar.errors import StoreUnavailable, UnansweredCall
from sidecar.ledger.journal import FLUSH_INTERVAL, Journal
from sidecar.metrics import Metrics
from sidecar.store.port import JournalEntry, Replayed

log = logging.getLogger("sidecar.ledger.merger")

MERGE_INTERVAL = 1.0  # seconds between attempts to merge the journal into the store
VOID_FENCE_SECONDS = 30  # a void's fence, renewed every FENCE_INTERVAL while its journal keeps it
FENCE_INTERVAL = 0.5  # seconds between renewals of the fences, beside the merges
# What the store had of a call whose reply was lost (sidecar_lost_replies_total{found}).
_FOUND = {
    Replayed.MERGED: "not_run",
    Replayed.NOT_RUN: "not_run",
    Replayed.RAN: "ran",
    Replayed.UNDONE: "ran",
    Replayed.BILLED: "ran_and_billed",
    Replayed.REPEATED: "repeated",
}


class Replays(Protocol):
    """Where entries merge: the store (Store.replay)."""

    async def replay(self, entry: JournalEntry) -> Replayed: ...


class Fences(Protocol):
    """Where voids are fenced: the billing side of the store (store/redis/outbox.py)."""

    async def fence(self, customer: str, void: UnansweredCall, seconds: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class Merger:
    """Merges one journal into the store. ``billed``: the usage of a customer at a time reached
    the store (or was undone there), so that window is to be closed and pushed (the billing
    marks, which live in a layer above this one)."""

    journal: Journal
    store: Replays
    metrics: Metrics
    billed: Callable[[str, float], None]

    async def merge(self) -> None:
        merged = await self.journal.replay(self.merge_entry)
        if merged:
            log.info("merged %d journal entries into the store", merged)
        self.metrics.journal_pending.set(self.journal.pending)

    async def merge_entry(self, entry: JournalEntry) -> None:
        replayed = await self.store.replay(entry)
        if replayed is Replayed.MERGED:
            self.metrics.journal_merged.inc()
        if entry.call is not None:
            self.metrics.lost_replies.labels(_FOUND[replayed]).inc()
        self.billed(entry.customer_id, entry.at)

    async def write(self) -> None:
        await self.journal.flush()
        self.metrics.journal_pending.set(self.journal.pending)


async def run_ledger(stack: AsyncExitStack, merger: Merger, *, fences: Fences) -> None:
    """Start the three loops; ``stack`` stops them on shutdown, then writes the last entries."""
    journal = merger.journal

    async def fence() -> None:
        await fence_voids(fences, journal)

    stack.push_async_callback(close_journal, journal)
    await _background(stack, every(FLUSH_INTERVAL, merger.write, "writing the journal"))
    await _background(stack, every(FENCE_INTERVAL, fence, "fencing the journal's voids"))
    await _background(stack, every(MERGE_INTERVAL, merger.merge, "merging the journal"))


async def fence_voids(fences: Fences, journal: Journal) -> None:
    """Fence, in the store, the billing windows of the customers this journal has voids for
    (every replica's close.lua leaves them open) while a void may have something to undo; a void
    that has nothing is settled here, and one that merges takes its fence with it (void.lua)."""
    for customer, void in journal.voids:
        try:
            if not await fences.fence(customer, void, VOID_FENCE_SECONDS):
                journal.settled(customer, void)
        except StoreUnavailable:
            continue  # that customer's master is down: the others are still fenced


async def every(seconds: float, work: Callable[[], Awaitable[None]], what: str) -> None:
    """Run `work` every `seconds` for the life of the process: an unexpected error is logged, and
    the next round runs (store outages are handled inside `work`; this is for bugs, which must
    not silently stop the journal for good)."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await work()
        except Exception:
            log.exception("%s failed; trying again in %g s", what, seconds)


async def close_journal(journal: Journal) -> None:
    await journal.flush()
    journal.close()


async def _background(stack: AsyncExitStack, work: Coroutine[object, object, None]) -> None:
    """Run `work` until shutdown, then stop it (tasks.stop: it may be cancelled more than once, so
    what must happen at the end is a callback of its own)."""
    task = asyncio.create_task(work)
    stack.push_async_callback(tasks.stop, task)
