"""A test that hangs fails, naming where each asyncio task waits, instead of holding CI for hours.

Each phase of a test (set-up, call, tear-down) gets PHASE_SECONDS. When they run out, SIGALRM
interrupts the main thread (the event loop's select, for an async test) and the phase fails with
the stack of every task of the running loop: where an await waits forever is the whole diagnosis.
The hooks are imported into conftest.py, which registers them.
"""

from __future__ import annotations

import asyncio
import io
import signal
from collections.abc import Generator
from types import FrameType

import pytest

PHASE_SECONDS = 240  # the slowest test, the quick soak, takes about 40 s on a loaded 2-core machine


def _expired(signum: int, frame: FrameType | None) -> None:
    pytest.fail(f"the test phase ran past {PHASE_SECONDS} s\n{_task_stacks()}", pytrace=True)


def _task_stacks() -> str:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "(no event loop was running: the traceback below is where it waited)"
    text = io.StringIO()
    for task in asyncio.all_tasks(loop):
        text.write(f"--- {task!r}\n")
        task.print_stack(file=text)
    return text.getvalue()


def _bounded() -> Generator[None, object, object]:
    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, PHASE_SECONDS)
    try:
        return (yield)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _bounded())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _bounded())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    return (yield from _bounded())
