"""The NDJSON import: one customer document (with its ``id``) a line, a million lines a minute.

Why it is shaped this way:

* The body is read in blocks of BLOCK_BYTES and each block is split and parsed in a thread
  (``asyncio.to_thread``): JSON and validation of a million lines would otherwise hold the event
  loop, and the replica's proxied requests with it, for seconds. A block is parsed while the
  block before is written, so the parse fills the writes' waits for Redis.
* A block's customers are written WRITE_SLICE at a time (CustomerDirectory.put): their claims,
  documents and index entries go in few script calls, not one per customer; up to IN_FLIGHT
  slices at once, so that Redis and this process work side by side.
* A bad line is written not at all (a key conflict is found before its document is written, its
  claims undone) and named by its number with every problem; the good lines around it are
  written. A line longer than MAX_LINE_BYTES is refused without being parsed.
* Importing a file again writes the same documents again: idempotent. A customer on several
  lines ends as its last line says. Blank lines are skipped.
* Memory stays flat: a block at a time, and at most MAX_LISTED_ERRORS problems listed (all
  counted).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sidecar.admission.customer_input import key_conflict, parse_line
from sidecar.admission.customers import CustomerDirectory
from sidecar.config.policy.model import Customer, Policy
from sidecar.store.port import WriteResult, Written

BLOCK_BYTES = 256 * 1024
MAX_LINE_BYTES = 64 * 1024
MAX_LISTED_ERRORS = 10_000
# Customers written together: their claims, documents and give-backs each one pipeline. Encoding a
# slice's calls holds the event loop, so a slice is small enough to keep that to a few ms.
WRITE_SLICE = 500
IN_FLIGHT = 4  # slices written at once


@dataclass
class ImportReport:
    """What an import did: lines read, customers written, bad lines (each with its problems)."""

    lines: int = 0
    imported: int = 0
    bad: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def refuse(self, line: int, problems: list[str]) -> None:
        self.bad += 1
        if len(self.errors) < MAX_LISTED_ERRORS:
            self.errors.append({"line": line, "errors": problems})

    def answer(self) -> dict[str, Any]:
        listed = {"errors_listed": len(self.errors)} if len(self.errors) < self.bad else {}
        return {
            "lines": self.lines,
            "imported": self.imported,
            "bad": self.bad,
            "errors": self.errors,
            **listed,
        }


@dataclass(frozen=True, slots=True)
class Parsed:
    """One block's lines: the customers with their line numbers, and the bad lines."""

    customers: list[tuple[int, Customer]]
    bad: list[tuple[int, list[str]]]


async def import_ndjson(
    chunks: AsyncIterator[bytes], policy: Policy, directory: CustomerDirectory
) -> ImportReport:
    """Import every line of the body; raises StoreUnavailable when the store stops answering (the
    lines before were written, and importing the file again is safe)."""
    report = ImportReport()
    writer = _Writer(policy, directory, report)
    try:
        async for first, block, too_long in _blocks(chunks):
            parsed = await asyncio.to_thread(parse_block, block, first, policy)
            parsed.bad.extend((number, [f"line longer than {MAX_LINE_BYTES} bytes"]) for number in too_long)
            await writer.write(parsed)
        await writer.finish()
    finally:
        await writer.cancel()
    report.errors.sort(key=lambda error: int(error["line"]))
    return report


def parse_block(block: bytes, first: int, policy: Policy) -> Parsed:
    """Parse whole lines numbered from ``first`` (run in a thread)."""
    parsed = Parsed([], [])
    for number, line in enumerate(block.split(b"\n"), start=first):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            parsed.bad.append((number, [f"line longer than {MAX_LINE_BYTES} bytes"]))
            continue
        customer = parse_line(line, policy)
        if isinstance(customer, list):
            parsed.bad.append((number, customer))
        else:
            parsed.customers.append((number, customer))
    return parsed


@dataclass(frozen=True, slots=True)
class _Slice:
    lines: list[tuple[int, Customer]]
    names: frozenset[str]  # its customer ids and key hashes
    task: asyncio.Future[list[WriteResult]]


class _Writer:
    """Writes WRITE_SLICE customers at a time, up to IN_FLIGHT slices at once, so that Redis runs
    one slice's scripts while this process encodes the next. A slice naming a customer id or key
    of a slice in flight waits for it: lines that touch one customer or one key are written in
    the file's order (the first line to claim a key wins it, the last line of a customer stays)."""

    def __init__(self, policy: Policy, directory: CustomerDirectory, report: ImportReport) -> None:
        self._policy, self._directory, self._report = policy, directory, report
        self._flight: deque[_Slice] = deque()

    async def write(self, parsed: Parsed) -> None:
        for number, problems in parsed.bad:
            self._report.lines = max(self._report.lines, number)
            self._report.refuse(number, problems)
        for at in range(0, len(parsed.customers), WRITE_SLICE):
            await self._start(parsed.customers[at : at + WRITE_SLICE])

    async def _start(self, lines: list[tuple[int, Customer]]) -> None:
        names = frozenset(c.id for _, c in lines) | {h for _, c in lines for h in c.api_key_hashes}
        while self._flight and (
            len(self._flight) >= IN_FLIGHT or any(not names.isdisjoint(s.names) for s in self._flight)
        ):
            await self._settle()
        writing = self._directory.put([c for _, c in lines], self._policy)
        self._flight.append(_Slice(lines, names, asyncio.create_task(writing)))

    async def _settle(self) -> None:
        done = self._flight.popleft()
        report = self._report
        for (number, _), result in zip(done.lines, await done.task, strict=True):
            report.lines = max(report.lines, number)
            if result.outcome is Written.STORED:
                report.imported += 1
            else:
                report.refuse(number, _problems(result))

    async def finish(self) -> None:
        while self._flight:
            await self._settle()

    async def cancel(self) -> None:
        """Stop the slices still in flight (the import failed or its client went away)."""
        tasks = [s.task for s in self._flight]
        for task in tasks:
            task.cancel()
        self._flight.clear()
        await asyncio.gather(*tasks, return_exceptions=True)


def _problems(result: WriteResult) -> list[str]:
    if result.outcome is Written.CONFLICT:
        return [key_conflict(index, owner) for index, owner in result.owners]
    return ["not written: the store took too long; import the line again"]


async def _blocks(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, bytes, list[int]]]:
    """Blocks of whole lines: (the first line's number, the lines, numbers of lines too long to
    keep, whose bytes are dropped as they arrive)."""
    buffered = bytearray()
    first = 1  # the number of the first line in ``buffered``
    too_long: list[int] = []
    skipping = False  # inside a line too long, dropping bytes until its end
    async for chunk in chunks:
        if skipping:
            end = chunk.find(b"\n")
            if end < 0:
                continue
            chunk, skipping = chunk[end + 1 :], False
            first += 1
        buffered += chunk
        cut = buffered.rfind(b"\n")
        if cut < 0 and len(buffered) > MAX_LINE_BYTES:
            too_long.append(first)
            buffered.clear()
            skipping = True
            continue
        if len(buffered) >= BLOCK_BYTES and cut >= 0:
            block = bytes(buffered[:cut])
            del buffered[: cut + 1]
            yield first, block, too_long
            first += block.count(b"\n") + 1
            too_long = []
    if buffered or too_long:
        yield first, bytes(buffered), too_long
