"""The store contract: what the gate and the admin API need from Redis, as plain values.

A refusal is a value (``Outcome.REFUSED``), not an exception. ``StoreUnavailable`` is raised
only when the store could not answer within its timeout; the caller then applies
``store_failure``. Nothing here imports redis.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from sidecar.policy.model import Limit
from sidecar.policy.windows import Window


@dataclass(frozen=True, slots=True)
class LimitCharge:
    """What one request adds to one limit.

    ``window`` is the calendar window (None for rate limits). ``enforced`` is False for soft
    (on_exceed: allow) and shadow limits, which are charged but never refuse. An ``amount`` of 0
    is a response-time meter: admitted while its balance is above zero, charged later.
    ``counts_requests`` says the unit is requests (else the meter's own unit).
    """

    limit: Limit
    amount: int
    window: Window | None
    enforced: bool
    counts_requests: bool = True


@dataclass(frozen=True, slots=True)
class UsageCharge:
    """What one request adds to the billing summary of (meter, feature) in the current window."""

    meter: str
    feature: str
    amount: int
    op: str  # "+" adds (count, sum); "max" / "min" keep the extreme; "uniq" notes `distinct`
    distinct: str = ""  # the value a unique meter saw; counted once per window at close


@dataclass(frozen=True, slots=True)
class MeterRequest:
    customer_id: str
    limits: tuple[LimitCharge, ...]
    usage: tuple[UsageCharge, ...]
    billing_interval: int


class Outcome(enum.Enum):
    ADMITTED = "admitted"
    REFUSED = "refused"
    STALE = "stale"  # a calendar window did not contain the store's time: recompute, call again


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit after the call: ``used`` includes the request only when it was admitted."""

    charge: LimitCharge
    used: int
    reset_seconds: float
    over: bool

    @property
    def remaining(self) -> int:
        return max(0, self.charge.limit.ceiling - self.used)


@dataclass(frozen=True, slots=True)
class Admission:
    outcome: Outcome
    store_time: float
    limits: tuple[LimitState, ...]


class Store(Protocol):
    def time(self) -> float:
        """The store's clock as last observed, advanced by the local clock; no I/O."""

    async def check_and_meter(self, request: MeterRequest) -> Admission:
        """Atomically check every limit and charge all of them and the usage, or nothing.

        One round trip. On REFUSED nothing in the store changed. On STALE nothing changed and
        ``store_time`` is the store's clock to recompute the calendar windows with.
        """

    async def charge(self, request: MeterRequest) -> Admission:
        """Charge response-time amounts to their limits and usage without checking; one round trip.

        ADMITTED when charged; STALE (nothing written) when a calendar window is not the store's.
        """

    async def read_limits(self, customer_id: str, charges: tuple[LimitCharge, ...]) -> Admission:
        """What each limit has used and when it resets, without changing anything."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    async def close(self) -> None: ...
