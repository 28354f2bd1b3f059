"""A threshold notification as the metering scripts record it (SPEC §9), and its id.

A metering call that takes a limit's usage across a threshold, or prepaid credit below one, writes
one record into the customer's notification outbox, under a ``crossing`` that names what crossed:
``<type>|<name>|<window>|<threshold>``. The script sets a marker for that crossing in the same
atomic step, so no other call, on any replica, records it again (lib.lua notify_crossings).

Types: ``limit.threshold`` (a limit's usage reached ``threshold`` percent of its ceiling in a
window: the calendar window, or for a moving window the period-long span of the epoch it crossed
in), ``credit.low`` (the credit drawn reached ``threshold`` percent of the credit granted and in
force; ``window`` names that set of grants) and ``credit.exhausted`` (the balance reached zero).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.store.summaries import DEFAULT_NAMESPACE, id_namespace

LIMIT_THRESHOLD = "limit.threshold"
CREDIT_LOW = "credit.low"
CREDIT_EXHAUSTED = "credit.exhausted"
RECENT_KEPT = 20  # notifications kept per customer for the inspection page, newest first


@dataclass(frozen=True, slots=True, kw_only=True)
class Notification:
    """One crossing, as recorded; ``limit`` is the limit's ceiling, or the credit granted."""

    customer: str
    crossing: str
    type: str
    name: str  # the limit's name (requests-month), or the prepaid meter's
    plan: str
    threshold: int
    used: int
    limit: int
    window_start: int | None  # None for credit
    window_end: int | None
    at: int  # store seconds when it crossed

    def id(self, namespace: str = DEFAULT_NAMESPACE) -> str:
        """sha1("[<namespace>|]<customer>|<crossing>"): the same for every resend, and distinct
        between deployments with their own billing.namespace (left out when it is the default)."""
        prefix = id_namespace(namespace)
        text = f"{prefix}{'|' if prefix else ''}{self.customer}|{self.crossing}"
        return hashlib.sha1(text.encode()).hexdigest()

    @classmethod
    def from_record(cls, customer: str, crossing: str, record: str | bytes) -> Notification:
        """The record the script wrote (cjson: short keys), under its crossing."""
        fields: dict[str, Any] = json.loads(record)
        return cls(
            customer=customer,
            crossing=crossing,
            type=str(fields["type"]),
            name=str(fields["name"]),
            plan=str(fields["plan"]),
            threshold=int(fields["threshold"]),
            used=int(fields["used"]),
            limit=int(fields["limit"]),
            window_start=_optional_int(fields.get("ws")),
            window_end=_optional_int(fields.get("we")),
            at=int(fields["at"]),
        )

    def record(self) -> str:
        """The stored form, as the script writes it (a redriven dead letter goes back as it was)."""
        fields = {"type": self.type, "name": self.name, "plan": self.plan, "threshold": self.threshold}
        fields |= {"used": self.used, "limit": self.limit, "ws": self.window_start, "we": self.window_end}
        return json.dumps({**fields, "at": self.at})


def _optional_int(value: object) -> int | None:
    return None if value is None else int(str(value))


class NotifyStore(Protocol):
    """The notification outboxes: the metering scripts write each crossing into its customer's
    (store/notifications.py); the notifier (billing/notifier.py) leases customers, one replica at
    a time each, delivers, and settles. The shared schedule is only an index, rebuilt by
    ``rebuild_schedule``. Every call but ``note`` waits as billing's do, and raises
    StoreUnavailable."""

    def note(self, customer: str) -> None:
        """A call of this process recorded a notification for the customer (no I/O)."""

    async def schedule_noted(self, at_ms: int) -> int:
        """Put the customers noted since the last call on the shared schedule, due at ``at_ms``."""

    async def claim(self, now_ms: int, lease_end_ms: int, limit: int) -> list[str]:
        """Lease up to ``limit`` customers due by ``now_ms`` until ``lease_end_ms``."""

    async def release(self, customer: str, lease_end_ms: int, due_ms: int | None) -> bool:
        """End a lease: off the schedule (None) or due again at ``due_ms``, unless someone
        scheduled the customer anew meanwhile."""

    async def pending(self, customer: str) -> list[Notification]:
        """The notifications waiting in a customer's outbox, oldest first."""

    async def settle(
        self, customer: str, crossings: tuple[str, ...], *, dead_reason: str | None = None
    ) -> int:
        """Delete delivered notifications, or move them to dead letters with a reason; how many wait."""

    async def dead_letters(self) -> list[tuple[Notification, str]]:
        """Every dead letter, with why the receiver refused it."""

    async def redrive(self, now_ms: int) -> int:
        """Move every dead letter back into its outbox, unchanged, due at once."""

    async def recent(self, customer: str) -> list[Notification]:
        """The customer's latest notifications as recorded (up to RECENT_KEPT, newest first)."""

    async def waiting(self) -> int:
        """Customers with notifications waiting (the schedule's size)."""

    async def rebuild_schedule(self) -> None:
        """Find every notification outbox anew and make sure each is scheduled."""
