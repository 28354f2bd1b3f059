"""Usage history (SPEC §7): the closed billing summaries of each window, kept ``history_days``.

close.lua adds every summary it closes to its day's history (store/redis/history.py), so the
history is what billing was sent, per window, whatever the receiver did with it; an amended
summary (a unit that reached its window after it was closed) adds to the same window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

DAY = 86400
HOUR = 3600
# Windows shorter than this are kept an hour a hash, longer ones a day a hash (close.lua
# HISTORY_SHORT): either way a hash holds a few hundred fields at most, which Redis keeps compact.
SHORT_WINDOW = 1800


@dataclass(frozen=True, slots=True, order=True)
class HistoryWindow:
    """One (window, meter, feature) of a customer's history: the value of its summaries."""

    window_start: int  # epoch seconds, inclusive
    window_end: int  # epoch seconds, exclusive
    meter: str
    feature: str
    value: int


class HistoryStore(Protocol):
    """The history side of the store; calls wait as billing's do and raise StoreUnavailable."""

    async def windows(self, customer: str, start: int, end: int) -> list[HistoryWindow]:
        """Every window of the customer's history that starts in [start, end), in order of start,
        meter and feature; one round trip (a day's history is one read)."""


def buckets(start: int, end: int, span: int) -> range:
    """The starts of the hours (``span`` HOUR) or days (DAY) holding windows that start in
    [start, end)."""
    return range(start - start % span, end, span)
