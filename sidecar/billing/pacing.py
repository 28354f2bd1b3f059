"""Keeping to a billing system's rate limits: its documented rates, and the waits it asks for.

A ``Pacer`` guards one endpoint. Every request waits its turn in ``acquire`` until starting it
keeps every ``Window`` within its rate (at most ``rate`` units begun in any one second: requests,
or events for a system that counts them) and any pause the system asked for (``Retry-After`` on
a 429 or 503) is over. Turns are taken in order (one lock), so no request starves. A request
that could not start before its deadline is not sent at all: the pusher reschedules it, without
counting a failure, rather than run past its lease.

Nothing here reads a clock but ``time.monotonic`` (waits) and ``time.time`` (an HTTP-date).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

RETRY_AFTER_CAP_SECONDS = 3600.0  # a longer wait asked for is held to an hour
_EPOCH_LIKE = 1_000_000_000  # an X-RateLimit-Reset this large is a unix time, not seconds


class Window:
    """At most ``rate`` units begun in any ``period`` seconds (a log of recent starts)."""

    def __init__(self, rate: float, period: float = 1.0) -> None:
        self.rate = rate
        self.period = period
        self._starts: collections.deque[tuple[float, int]] = collections.deque()
        self._used = 0

    def wait(self, units: int, now: float) -> float:
        """Seconds until ``units`` more may begin (0: now)."""
        self._forget(now)
        excess = self._used + units - self.rate
        if excess <= 0:
            return 0.0
        for started, amount in self._starts:
            excess -= amount
            if excess <= 0:
                return started + self.period - now
        return 0.0  # more than the rate at once: it goes alone

    def record(self, units: int, now: float) -> None:
        self._starts.append((now, units))
        self._used += units

    def _forget(self, now: float) -> None:
        while self._starts and self._starts[0][0] <= now - self.period:
            self._used -= self._starts.popleft()[1]


class Pacer:
    """One endpoint's rate windows and the pause its answers asked for."""

    def __init__(self, *, requests_per_second: float | None, events_per_second: float | None) -> None:
        self._requests = Window(requests_per_second) if requests_per_second else None
        self._events = Window(events_per_second) if events_per_second else None
        self._paused_until = 0.0  # monotonic
        self._turn = asyncio.Lock()

    async def acquire(self, events: int, deadline: float) -> bool:
        """Wait until a request carrying ``events`` may begin, and count it begun; False, and
        nothing counted, when that would be after ``deadline`` (monotonic)."""
        async with self._turn:
            while True:
                now = time.monotonic()
                if now > deadline:
                    return False
                wait = self._wait(events, now)
                if wait <= 0:
                    self._record(events, now)
                    return True
                if now + wait > deadline:
                    return False
                await asyncio.sleep(wait)

    def pause(self, seconds: float) -> None:
        """No request begins for ``seconds`` (a Retry-After); a longer pause already set stands."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def _wait(self, events: int, now: float) -> float:
        waits = [self._paused_until - now]
        if self._requests is not None:
            waits.append(self._requests.wait(1, now))
        if self._events is not None:
            waits.append(self._events.wait(events, now))
        return max(waits)

    def _record(self, events: int, now: float) -> None:
        if self._requests is not None:
            self._requests.record(1, now)
        if self._events is not None:
            self._events.record(events, now)


def retry_after(status: int, headers: Mapping[str, str]) -> float | None:
    """Seconds the receiver asked us to wait, or None. ``Retry-After`` (seconds or an HTTP-date,
    RFC 9110 §10.2.3) on any answer; on a 429 without one, ``X-RateLimit-Reset``: seconds until
    the window resets (Lago), or a unix time when it is that large (OpenMeter, which also sends
    Retry-After). Held to 0..RETRY_AFTER_CAP_SECONDS."""
    seconds = _seconds(headers.get("Retry-After"))
    if seconds is None and status == 429:
        seconds = _reset_seconds(headers.get("X-RateLimit-Reset"))
    return None if seconds is None else min(max(seconds, 0.0), RETRY_AFTER_CAP_SECONDS)


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        return parsedate_to_datetime(text).timestamp() - time.time()
    except (TypeError, ValueError, IndexError):
        return None


def _reset_seconds(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    if number is None:
        return None
    return number - time.time() if number >= _EPOCH_LIKE else number
