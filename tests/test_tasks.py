"""Stopping a background task ends it even when a cancellation is swallowed (sidecar/tasks.py)."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from sidecar import tasks
from sidecar.errors import StoreUnavailable
from sidecar.store.redis.store import bounded
from sidecar.store.redis.topology import Topology

STOP_BOUND_SECONDS = 5.0


async def _swallows_one_cancellation(ticks: list[int]) -> None:
    """What a loop looks like when a library swallowed the cancellation: it runs on."""
    swallowed = False
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed = True
        ticks.append(1)


async def test_a_task_that_swallows_a_cancellation_is_still_stopped() -> None:
    ticks: list[int] = []
    task = asyncio.create_task(_swallows_one_cancellation(ticks))
    await asyncio.sleep(0.05)
    async with asyncio.timeout(STOP_BOUND_SECONDS):
        await tasks.stop(task)
    assert task.cancelled()


async def test_stop_raises_the_exception_a_task_ended_with() -> None:
    async def fails() -> None:
        raise ValueError("broken")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="broken"):
        await tasks.stop(task)


async def test_a_loop_calling_redis_is_stopped_whenever_its_cancellation_lands(redis_url: str) -> None:
    """The loop of customers.py: redis-py calls through the client every store part uses. On
    Python 3.11 a single cancel of such a loop was swallowed in 175 of 300 tries (redis-py's
    socket writes go through asyncio.wait_for); stop() must end it every time."""
    client = Topology.parse(redis_url).client(2.0, max_connections=4)

    async def polls() -> None:
        while True:
            with contextlib.suppress(StoreUnavailable):
                await bounded(client.get("version"), 2.0)
            await asyncio.sleep(0)

    try:
        chance = random.Random(7)
        for _ in range(40):
            task = asyncio.create_task(polls())
            await asyncio.sleep(chance.random() * 0.002)
            async with asyncio.timeout(STOP_BOUND_SECONDS):
                await tasks.stop(task)
            assert task.cancelled()
    finally:
        await client.aclose()


async def test_stop_all_lets_no_task_run_on_when_the_caller_is_cancelled_meanwhile() -> None:
    ticks: list[int] = []
    group = [asyncio.create_task(_swallows_one_cancellation(ticks)) for _ in range(3)]
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(tasks.stop_all(group))
    await asyncio.sleep(0)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert all(task.done() for task in group)


async def test_finish_waits_for_the_work_to_end_when_the_caller_is_cancelled_meanwhile() -> None:
    ended = asyncio.Event()

    async def write() -> str:
        await asyncio.sleep(0.05)
        ended.set()
        return "written"

    waiting = asyncio.create_task(tasks.finish(asyncio.ensure_future(write())))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert ended.is_set()
