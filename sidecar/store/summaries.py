"""A usage summary: every unit of one (customer, meter, feature, window), frozen with its id.

The id is derived from those fields and the window's revision (1 for the first close; a unit
that arrives after its window was closed is sent in a later revision with its own id), so a
resend of the same summary always carries the same id and the same value.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from sidecar.config.policy.windows import rfc3339


def summary_id(customer: str, meter: str, feature: str, window_start: int, revision: int) -> str:
    """The SHA-1 of the identifying fields; close.lua computes the same with redis.sha1hex."""
    text = f"{customer}|{meter}|{feature}|{window_start}|{revision}"
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    id: str
    customer: str
    plan: str
    meter: str
    aggregation: str
    feature: str
    value: int
    window_start: int  # epoch seconds, inclusive
    window_end: int  # epoch seconds, exclusive

    def to_json(self) -> dict[str, Any]:
        """The SPEC §6 `json` form of one summary."""
        return {
            "id": self.id,
            "customer": self.customer,
            "plan": self.plan,
            "meter": self.meter,
            "aggregation": self.aggregation,
            "feature": self.feature,
            "value": self.value,
            "window_start": rfc3339(self.window_start),
            "window_end": rfc3339(self.window_end),
        }
