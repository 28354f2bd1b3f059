"""A circuit breaker in front of the store: after repeated failures, stop calling it for a while.

With Redis dead or paused, every call would otherwise wait the whole store timeout and hold a
pooled connection while it does. Once ``threshold`` calls in a row have failed, the breaker opens:
calls fail at once (StoreUnavailable, answered by store_failure) for ``cooldown`` seconds. Then
one call at a time is let through as a probe; the first success closes the breaker.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(
        self, *, threshold: int = 5, cooldown: float = 0.5, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        """The store is being treated as down (readiness and the metrics say so)."""
        return self._opened_at is not None

    def allow(self) -> bool:
        """Whether a call may go to the store now; while open, only one probe per cooldown."""
        if self._opened_at is None:
            return True
        if self._probing or self._clock() - self._opened_at < self._cooldown:
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failed(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self._threshold:
            self._opened_at = self._clock()
        self._probing = False
