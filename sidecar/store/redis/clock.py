"""The store's clock as this process estimates it, learned from the TIME every script returns.

A sample is the store's time minus the local time when its reply was handled. A reply handled
late (a busy event loop, a batch's replies resumed one after another) gives a smaller sample,
never a larger one, so the largest sample is the best estimate; samples older than
SAMPLE_SECONDS give way, so that a local clock stepped forward is followed within a second.
Script deadlines and calendar windows are computed from this estimate: an estimate that lagged
under load made scripts expire before the sidecar had given up on them (spurious 503s).
"""

from __future__ import annotations

import time
from collections.abc import Callable

SAMPLE_SECONDS = 1.0


class StoreClock:
    def __init__(
        self, *, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._offset = 0.0
        self._sampled: float | None = None

    def now(self) -> float:
        """The store's time now, as far as this process can tell; no I/O."""
        return self._wall() + self._offset

    def learn(self, store_time: float) -> None:
        """Take the store's time from a reply just handled."""
        sample = store_time - self._wall()
        seen = self._monotonic()
        if self._sampled is None or sample >= self._offset or seen - self._sampled > SAMPLE_SECONDS:
            self._offset, self._sampled = sample, seen
