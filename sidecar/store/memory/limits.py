"""The memory store's limits, one class per algorithm (as store/redis/limit_kinds.py and lib.lua's
read_limit and charge_limit are for Redis): what a limit has used and when it frees units, and
adding to it with a way to undo that (for a reservation). A new algorithm is a class here and
its line in ``limit_kinds``."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from sidecar.config.policy.model import Algorithm
from sidecar.config.policy.windows import Window
from sidecar.store.port import LimitCharge, LimitState

MICRO = 1_000_000
Undo = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Now:
    """The store's time of one call, in whole microseconds like Redis TIME."""

    us: int

    @property
    def s(self) -> int:
        return self.us // MICRO

    @property
    def at(self) -> float:
        return self.us / MICRO


@dataclass(slots=True)
class LimitRead:
    """One limit as one call read it (lib.lua's ``l``): used includes what the call charged."""

    charge: LimitCharge
    customer: str
    used: int
    reset_us: int
    over: bool = False

    @property
    def refuses(self) -> bool:
        return self.over and self.charge.enforced and not self.charge.allowance

    def state(self, *, over: bool = True) -> LimitState:
        return LimitState(self.charge, self.used, self.reset_us / MICRO, over and self.over)


def needed(amount: int) -> int:
    """Units a request needs free: its amount, or one for a meter charged at response time."""
    return max(amount, 1)


def rate_wait(live: Iterable[tuple[int, int]], horizon: int, units: int) -> int:
    """Microseconds until ``units`` units have left the window, oldest first; 0 if they never do."""
    freed = 0
    for at, amount in live:
        freed += amount
        if freed >= units:
            return at - horizon
    return 0


class LimitKind(Protocol):
    """The state of every limit of one algorithm: read one, add to one (returning its undo)."""

    def read(self, customer: str, charge: LimitCharge, now: Now) -> LimitRead: ...

    def add(self, limit: LimitRead, amount: int, now: Now) -> Undo: ...


class MovingWindows:
    """Per (customer, limit name), a log of (µs, amount) entries, oldest first; an entry counts
    while its time is inside (now - window, now] (lib.lua read_rate, charge_rate)."""

    def __init__(self) -> None:
        self._logs: dict[tuple[str, str], deque[tuple[int, int]]] = {}

    def read(self, customer: str, charge: LimitCharge, now: Now) -> LimitRead:
        horizon = now.us - charge.limit.period.seconds * MICRO
        live = [entry for entry in self._logs.get((customer, charge.limit.name), ()) if entry[0] > horizon]
        used = sum(amount for _, amount in live)
        return LimitRead(charge, customer, used, self._reset(live, horizon, charge, used))

    @staticmethod
    def _reset(live: list[tuple[int, int]], horizon: int, charge: LimitCharge, used: int) -> int:
        window_us = charge.limit.period.seconds * MICRO
        need, ceiling = needed(charge.amount), charge.limit.ceiling
        if need > ceiling:
            return window_us
        if used + need > ceiling:
            return rate_wait(live, horizon, used + need - ceiling)
        return rate_wait(live, horizon, 1) or window_us

    def add(self, limit: LimitRead, amount: int, now: Now) -> Undo:
        key = (limit.customer, limit.charge.limit.name)
        log = self._logs.setdefault(key, deque())
        horizon = now.us - limit.charge.limit.period.seconds * MICRO
        while log and log[0][0] <= horizon:
            log.popleft()
        entry = (now.us, amount)
        log.append(entry)
        return lambda: self._remove(key, entry)

    def _remove(self, key: tuple[str, str], entry: tuple[int, int]) -> None:
        """Take an entry out of its window, if it is still there."""
        log = self._logs.get(key)
        if log is not None and entry in log:
            log.remove(entry)


class CalendarQuotas:
    """Per (customer, limit name, window start), a counter (lib.lua charge_calendar)."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str, int], int] = {}

    def read(self, customer: str, charge: LimitCharge, now: Now) -> LimitRead:
        start, end = calendar_window_of(charge)
        used = self._counters.get((customer, charge.limit.name, start), 0)
        return LimitRead(charge, customer, used, end * MICRO - now.us)

    def add(self, limit: LimitRead, amount: int, now: Now) -> Undo:
        key = (limit.customer, limit.charge.limit.name, calendar_window_of(limit.charge)[0])
        self._counters[key] = self._counters.get(key, 0) + amount
        return lambda: self._take(key, amount)

    def _take(self, key: tuple[str, str, int], amount: int) -> None:
        if key in self._counters:
            self._counters[key] -= amount


def calendar_window_of(charge: LimitCharge) -> Window:
    if charge.window is None:
        raise ValueError(f"limit {charge.limit.name} counts in calendar windows: its charge needs one")
    return charge.window


def limit_kinds() -> Mapping[Algorithm, LimitKind]:
    """Fresh state for every algorithm a limit may use."""
    return {Algorithm.MOVING_WINDOW: MovingWindows(), Algorithm.CALENDAR_QUOTA: CalendarQuotas()}
