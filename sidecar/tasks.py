"""Stopping a background task: a cancellation can be swallowed, so it is repeated until the task ends.

On Python 3.11, ``asyncio.wait_for`` returns the result instead of raising when the cancellation
arrives just as the awaited operation completes (CPython gh-86296, fixed in 3.12). redis-py bounds
every socket write with it (``Connection.send_packed_command``, when ``socket_timeout`` is set, as
ours always is), so a loop that calls Redis and is cancelled once can miss the cancellation and
loop on, and a shutdown that awaits it never ends: `sidecar run` ignoring SIGTERM. The test suite
found it: tests/test_tasks.py.
"""

from __future__ import annotations

import asyncio
import contextlib

RECANCEL_SECONDS = 0.1  # how long a cancelled task has to end before it is cancelled again


async def stop(task: asyncio.Task[object]) -> None:
    """Cancel ``task`` and wait until it has ended; an exception it ended with other than the
    cancellation is raised here. The task must do nothing on cancellation that a second
    cancellation could cut short: cleanup belongs to whoever stops it, after this returns."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_SECONDS)
    with contextlib.suppress(asyncio.CancelledError):
        await task
