"""Keeping to a billing system's rate limits (billing/pacing.py): the one-second windows, the pause
an answer asks for, and reading Retry-After and X-RateLimit-Reset."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from sidecar.billing.pacing import RETRY_AFTER_CAP_SECONDS, Pacer, Window, retry_after


def test_a_window_lets_its_rate_begin_then_waits_for_the_oldest_to_leave() -> None:
    window = Window(3)
    for at in (0.0, 0.2, 0.4):
        assert window.wait(1, at) == 0.0
        window.record(1, at)
    assert window.wait(1, 0.5) == pytest.approx(0.5)  # the start at 0.0 leaves at 1.0
    assert window.wait(2, 0.5) == pytest.approx(0.7)  # and the one at 0.2 at 1.2
    assert window.wait(1, 1.0) == 0.0


def test_a_window_counts_events_when_asked_to() -> None:
    window = Window(100)
    window.record(60, 0.0)
    assert window.wait(40, 0.1) == 0.0
    assert window.wait(41, 0.1) == pytest.approx(0.9)


def test_more_than_the_rate_at_once_goes_alone() -> None:
    assert Window(10).wait(11, 0.0) == 0.0


async def test_a_pacer_holds_starts_to_its_rate() -> None:
    pacer = Pacer(requests_per_second=5, events_per_second=None)
    started = time.monotonic()
    for _ in range(11):
        assert await pacer.acquire(1, started + 10)
    assert time.monotonic() - started >= 2.0 - 0.05  # 5 at once, 5 a second later, 1 after that


async def test_a_pause_holds_every_start_and_a_deadline_it_would_pass_refuses() -> None:
    pacer = Pacer(requests_per_second=None, events_per_second=None)
    pacer.pause(0.3)
    started = time.monotonic()
    assert not await pacer.acquire(1, started + 0.1)
    assert time.monotonic() - started < 0.1
    assert await pacer.acquire(1, started + 1)
    assert time.monotonic() - started >= 0.3 - 0.02


async def test_a_deadline_already_past_refuses_even_without_a_wait() -> None:
    pacer = Pacer(requests_per_second=None, events_per_second=None)
    assert not await pacer.acquire(1, time.monotonic() - 1)


async def test_turns_are_taken_in_order() -> None:
    pacer = Pacer(requests_per_second=2, events_per_second=None)
    order: list[int] = []

    async def take(n: int) -> None:
        await pacer.acquire(1, time.monotonic() + 10)
        order.append(n)

    await asyncio.gather(*(take(n) for n in range(5)))
    assert order == [0, 1, 2, 3, 4]


def http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.fromtimestamp(time.time() + seconds_from_now, UTC), usegmt=True)


@pytest.mark.parametrize(
    "status, headers, expected",
    [
        pytest.param(429, {"Retry-After": "7"}, 7.0, id="seconds"),
        pytest.param(503, {"Retry-After": "7"}, 7.0, id="seconds-on-503"),
        pytest.param(429, {"Retry-After": "soon"}, None, id="unreadable"),
        pytest.param(429, {"X-RateLimit-Reset": "4"}, 4.0, id="lago-reset-seconds"),
        pytest.param(503, {"X-RateLimit-Reset": "4"}, None, id="reset-only-on-429"),
        pytest.param(429, {"Retry-After": "2", "X-RateLimit-Reset": "9"}, 2.0, id="retry-after-first"),
        pytest.param(429, {"Retry-After": "86400"}, RETRY_AFTER_CAP_SECONDS, id="held-to-the-cap"),
        pytest.param(500, {}, None, id="none"),
    ],
)
def test_retry_after(status: int, headers: dict[str, str], expected: float | None) -> None:
    assert retry_after(status, headers) == expected


def test_retry_after_as_an_http_date_and_a_reset_as_a_unix_time() -> None:
    assert retry_after(429, {"Retry-After": http_date(30)}) == pytest.approx(30, abs=1.5)
    assert retry_after(429, {"Retry-After": http_date(-30)}) == 0.0
    reset = str(int(time.time()) + 20)
    assert retry_after(429, {"X-RateLimit-Reset": reset}) == pytest.approx(20, abs=1.5)
