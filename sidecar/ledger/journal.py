"""The local journal: usage the store could not take, kept on disk until it can (SPEC §5).

Three things land here: requests admitted while the store was unreachable under
``store_failure: open``, response-time charges that could not be sent, and voids: requests
answered 503 under ``closed`` whose metering call was sent but never answered (it may have run,
and is undone if it did). An entry made for an unanswered call names it, and merging it asks the
store first whether that call ran (lib.lua remember_call), so usage is neither lost nor counted
twice when a reply is lost with its connection. Recording is a list
append on the hot path (no I/O); a background task writes the entries to a segment file under
``--data-dir`` every FLUSH_INTERVAL with fsync, so a restart keeps them (a crash loses at most the
last interval). An entry says what the request used (entry.py), not how a script is called, so
a segment written before an upgrade merges after it. When the store answers again, each entry is
merged by the store's replay once — a marker per entry id makes a replay that is retried, or that
two processes race on, count once — at the time it happened, and the customer is marked for
billing (merger.py runs the loops).

Each process writes its own segment, locked while it is open; closed segments and the segments
of processes that died are replayed by whichever process gets their lock first.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

from sidecar import tasks
from sidecar.errors import StoreUnavailable, UnansweredCall
from sidecar.ledger.entry import UnreadableEntry, decode, encode
from sidecar.metrics import Metrics
from sidecar.store.port import Dedupe, JournalEntry, MeterRequest, UsageEntry, UsageRecord, VoidEntry

log = logging.getLogger("sidecar.ledger.journal")

FLUSH_INTERVAL = 0.1  # seconds
# Customers whose entries merge side by side. Each lane holds one store connection at a time;
# 16 of the store client's 64 leave the rest to the admin API and the customer refresh.
MERGE_LANES = 16
SEGMENT_SUFFIX = ".journal"
Merge = Callable[[JournalEntry], Awaitable[object]]  # raises StoreUnavailable while the store is down


class Journal:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._buffer: list[UsageEntry | VoidEntry] = []
        self._segment: IO[str] | None = None
        self._segment_path: Path | None = None
        self._written = 0
        self._kept = 0  # entries of segments the last replay had to keep (the store was down)
        # Flushes run beside replays (a replay may take seconds): a write to the open segment and
        # a replay closing that segment must not overlap.
        self._segment_use = asyncio.Lock()
        self._voids: set[tuple[str, UnansweredCall]] = set()  # recorded here, not merged yet
        directory.mkdir(parents=True, exist_ok=True)

    def record(
        self,
        request: MeterRequest,
        at: float,
        unanswered: UnansweredCall | None = None,
        dedupe: Dedupe | None = None,
    ) -> None:
        """Keep one request's usage; written to disk by the next flush. ``unanswered``: the
        metering call for it was sent, and may have run (then this usage is not merged).
        ``dedupe``: a usage record's, merged once per its key (it may reach the store through
        another replica meanwhile)."""
        self._buffer.append(UsageEntry(uuid.uuid4().hex, at, request, unanswered, dedupe))

    def void(self, customer_id: str, unanswered: UnansweredCall, at: float) -> None:
        """Keep a call to undo, if the store ran it: the request it metered was refused."""
        self._buffer.append(VoidEntry(uuid.uuid4().hex, customer_id, at, unanswered))
        self._voids.add((customer_id, unanswered))

    @property
    def voids(self) -> frozenset[tuple[str, UnansweredCall]]:
        """The voids this process recorded and has not merged yet, by customer. Their customers'
        billing windows are fenced meanwhile (merger.py), so the undo reaches the usage before
        a summary of it is made: void.lua leaves a call whose usage was billed first as it is."""
        return frozenset(self._voids)

    @property
    def voiding(self) -> frozenset[str]:
        """The customers of those voids."""
        return frozenset(customer for customer, _ in self._voids)

    def settled(self, customer_id: str, unanswered: UnansweredCall) -> None:
        """A void needs no fence any more: it merged, or the store has nothing to undo for it."""
        self._voids.discard((customer_id, unanswered))

    @property
    def pending(self) -> int:
        """Entries not yet known to be merged: in memory, in this process's open segment, and in
        the segments the last replay found the store down for (its own, or a dead process's)."""
        return len(self._buffer) + self._written + self._kept

    async def flush(self) -> None:
        async with self._segment_use:
            if self._buffer:
                entries, self._buffer = self._buffer, []
                self._written += len(entries)  # counted as pending while they are being written, too
                # Waited for to the end, even when cancelled: the lock must not be released (to a
                # final flush or a close) while the thread still writes.
                await tasks.finish(asyncio.ensure_future(asyncio.to_thread(self._append, entries)))

    def _append(self, entries: list[UsageEntry | VoidEntry]) -> None:
        lines = [encode(entry) for entry in entries]  # here, off the event loop
        if self._segment is None:
            self._segment_path = self._directory / f"{os.getpid()}-{uuid.uuid4().hex[:8]}{SEGMENT_SUFFIX}"
            self._segment = self._segment_path.open("a", encoding="utf-8")
            fcntl.flock(self._segment, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._segment.write("".join(f"{line}\n" for line in lines))
        self._segment.flush()
        os.fsync(self._segment.fileno())

    async def replay(self, merge: Merge) -> int:
        """Flush, close this process's segment, and merge every segment nobody else holds.

        ``merge`` is awaited for each entry and raises StoreUnavailable when the store is down;
        the segment is then kept, to be replayed again (entries merged already are skipped by
        their markers). Returns the entries merged.
        """
        await self.flush()
        async with self._segment_use:
            if self._segment is not None:
                self._segment.close()  # releases its lock: replayed below like any closed segment
                self._segment = None
                self._kept += self._written  # still pending while this replay runs
                self._written = 0

        async def merge_and_count(entry: JournalEntry) -> None:
            await merge(entry)
            if isinstance(entry, VoidEntry):  # recorded by this process or another; by identity, so once
                self.settled(entry.customer_id, entry.call)

        merged = kept = 0
        for path in sorted(self._directory.glob(f"*{SEGMENT_SUFFIX}")):
            claimed = await asyncio.to_thread(_claim, path)
            if claimed is None:
                continue  # a live process's open segment, or another replayer's
            handle, lines = claimed
            with handle:  # closed (its lock released) also when the replay is cancelled
                entries = _entries(path, lines)
                done = 0 if kept else await _merge_segment(entries, merge_and_count)  # store down: count only
                merged += done
                if done == len(entries):
                    path.unlink(missing_ok=True)
                    continue
                if not kept:
                    log.info("store unavailable while replaying %s; kept for the next attempt", path.name)
                kept += len(entries) - done
        self._kept = kept
        return merged

    def close(self) -> None:
        if self._segment is not None:
            self._segment.close()
            self._segment = None


async def _merge_segment(entries: list[JournalEntry], merge: Merge) -> int:
    """How many of the entries were merged before the store failed (all: it did not).

    Each customer's entries merge one after another, in the order they were written; up to
    MERGE_LANES customers merge side by side, so their store calls overlap instead of costing a
    round trip each, end to end. The order between customers does not matter: every key a merge
    writes is its own customer's (store/keys.py). The first failure stops every lane, as the
    store is likely down; what merged already is skipped by its marker when the segment is
    merged again.
    """
    by_customer: dict[str, list[JournalEntry]] = {}
    for entry in entries:
        by_customer.setdefault(entry.customer_id, []).append(entry)
    waiting = iter(by_customer.values())  # shared: each lane takes the next customer
    done = 0
    failed = False

    async def lane() -> None:
        nonlocal done, failed
        for own in waiting:
            for entry in own:
                if failed:
                    return
                try:
                    await merge(entry)
                except StoreUnavailable:
                    failed = True
                    return
                except BaseException:
                    failed = True
                    raise
                done += 1

    lanes = [asyncio.create_task(lane()) for _ in range(min(MERGE_LANES, len(by_customer)))]
    try:
        await asyncio.gather(*lanes)
    finally:
        failed = True  # cancelled, or a lane failed: no lane starts another entry
        await tasks.stop_all(lanes)  # none merges on behind the segment's lock, released next
    return done


def _entries(path: Path, lines: list[str]) -> list[JournalEntry]:
    """The entries of a segment; a line cut short by a crash mid-write (or one of a version this
    release does not know, after a downgrade) is skipped and logged."""
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entries.append(decode(line))
        except UnreadableEntry as error:
            log.warning("journal %s line %d is %s; skipped", path.name, number, error)
    return entries


def _claim(path: Path) -> tuple[IO[str], list[str]] | None:
    """The segment's lines, holding its lock; None when another process holds it."""
    try:
        handle = path.open("r", encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle, handle.read().splitlines()


def keep_in_journal(
    journal: Journal | None,
    metrics: Metrics,
    clock: Callable[[], float],
    request: MeterRequest,
    source: str,
    unanswered: UnansweredCall | None = None,
) -> None:
    """Keep usage the store could not take (``source``: admission or charge) in the local
    journal, to be merged when it answers (unless ``unanswered``, the call sent for it, turns out
    to have run). ``clock``: the store's, as the sidecar last saw it."""
    if journal is None:
        log.warning("no journal: %s usage of %s is lost", source, request.customer_id)
        return
    journal.record(request, clock(), unanswered)
    metrics.journal_recorded.labels(source).inc()


def keep_record_in_journal(journal: Journal | None, metrics: Metrics, record: UsageRecord) -> bool:
    """Keep a usage record the store could not take (``store_failure: open``), at its own time,
    to be merged once per its key when the store answers; False when there is no journal."""
    if journal is None:
        log.warning("no journal: a usage record of %s is lost", record.request.customer_id)
        return False
    journal.record(record.request, record.at, dedupe=record.dedupe)
    metrics.journal_recorded.labels("record").inc()
    return True


def void_in_journal(
    journal: Journal | None,
    metrics: Metrics,
    clock: Callable[[], float],
    customer_id: str,
    unanswered: UnansweredCall,
) -> None:
    """Keep the unanswered metering call of a request answered 503, to be undone if it ran."""
    if journal is None:
        log.warning("no journal: a call that may have metered a refused request of %s stays", customer_id)
        return
    journal.void(customer_id, unanswered, clock())
    metrics.journal_recorded.labels("void").inc()
