"""Which customers this process charged since the last pusher cycle, and when each may close.

Kept in memory and handed to the shared DIRTY schedule once a second, so the hot path writes
nothing extra to Redis. A mark lost to a crash only delays a close: the pusher's periodic scan
finds every usage hash anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sidecar.config.policy.model import Billing
from sidecar.config.policy.windows import billing_window


@dataclass(slots=True)
class DirtyMarks:
    """Customers this process charged since the last cycle, each with when its window may close."""

    due_ms: dict[str, int] = field(default_factory=dict)

    def note(self, customer: str, store_time: float, billing: Billing) -> None:
        window_end = billing_window(store_time, billing.interval)[1]
        due = (window_end + billing.grace) * 1000
        if due < self.due_ms.get(customer, due + 1):
            self.due_ms[customer] = due

    def take(self) -> dict[str, int]:
        taken, self.due_ms = self.due_ms, {}
        return taken

    def put_back(self, dues: Mapping[str, int]) -> None:
        for customer, due in dues.items():
            self.due_ms[customer] = min(due, self.due_ms.get(customer, due))
