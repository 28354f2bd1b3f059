"""Stopping tasks and waiting for work that must finish, when a cancellation can be swallowed.

On Python 3.11, ``asyncio.wait_for`` returns the result instead of raising when the cancellation
arrives just as the awaited operation completes (CPython gh-86296, fixed in 3.12). redis-py bounds
every socket write with it (``Connection.send_packed_command``, when ``socket_timeout`` is set, as
ours always is), so a loop that calls Redis and is cancelled once can miss the cancellation and
loop on, and a shutdown that awaits it never ends: `sidecar run` ignoring SIGTERM. The test suite
found it: tests/test_tasks.py. So a task is cancelled again until it has ended.

The other half: what a caller waits for in a ``finally`` (tasks it started, a thread writing a
file) must have ended before the caller goes on, even when the caller is cancelled meanwhile, or
it would run on behind a lock or a file the caller then releases. Such a cancellation is raised
once the wait is over, not lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any, TypeVar

T = TypeVar("T")
RECANCEL_SECONDS = 0.1  # how long a cancelled task has to end before it is cancelled again


async def stop(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended; an exception it ended with other than the
    cancellation is raised here. What must happen after it belongs to the caller, after this
    returns: a task may be cancelled more than once, which can cut its own cleanup short."""
    await stop_all((task,))
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error


async def stop_all(group: Collection[asyncio.Task[Any]]) -> None:
    """Cancel every task of ``group`` and wait until all have ended. What they ended with is not
    raised (the caller has its own exception, or had them gathered)."""
    try:
        await _wait_out(group, cancel=True)
    finally:
        for task in group:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: asyncio would log one nobody looked at


async def finish(work: asyncio.Future[T]) -> T:
    """The result of ``work``, waited for to the end even if the caller is cancelled meanwhile
    (a thread's write cannot be stopped half-way); the cancellation is raised once it has ended."""
    await _wait_out((work,), cancel=False)
    return work.result()


async def _wait_out(group: Collection[asyncio.Future[Any]], *, cancel: bool) -> None:
    """Wait until every future of ``group`` is done (cancelling each again every RECANCEL_SECONDS
    when ``cancel``); a cancellation of the caller meanwhile is raised only then."""
    interrupted = False
    while not all(future.done() for future in group):
        if cancel:
            for future in group:
                future.cancel()
        try:
            await asyncio.wait(group, timeout=RECANCEL_SECONDS)
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError
