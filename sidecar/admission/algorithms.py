"""Admission's side of each limit algorithm: the window a request's charge names, by Algorithm.

A calendar quota counts in the UTC day, week or month that contains `now` (the store answers
"stale" when its own clock is in another one, and admission asks again); a moving window has no
window of its own to name, as the store places it at its clock's time. The store's side of the
same algorithms, the Lua kind tag and arguments, is store/redis/limit_kinds.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import date
from types import MappingProxyType

from sidecar.config.policy.model import Algorithm, Limit
from sidecar.config.policy.windows import Window, calendar_window

WindowRule = Callable[[Limit, float, date | None], Window | None]


def _no_window(limit: Limit, now: float, anchor: date | None) -> Window | None:
    return None


def _calendar(limit: Limit, now: float, anchor: date | None) -> Window | None:
    return calendar_window(limit.period, now, anchor)


WINDOWS: Mapping[Algorithm, WindowRule] = MappingProxyType(
    {
        Algorithm.MOVING_WINDOW: _no_window,
        Algorithm.CALENDAR_QUOTA: _calendar,
    }
)


def window(limit: Limit, now: float, anchor: date | None) -> Window | None:
    """The window a charge to ``limit`` at ``now`` names (None when its algorithm names none);
    ``anchor`` is the customer's billing anchor, where a month starts."""
    return WINDOWS[limit.algorithm](limit, now, anchor)
