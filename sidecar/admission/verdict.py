"""What admission decided about one request: a Decision and everything the answer is built from.

A refusal is a value here, never an exception; http/problems.py is the one place a Verdict
becomes a status code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sidecar.config.policy.model import ChargeSpec, Customer, Feature, Plan
from sidecar.errors import UnansweredCall
from sidecar.store.port import CreditState, LimitState, MeterRequest


class Decision(enum.Enum):
    PUBLIC = "public"  # no identity, no metering
    ADMITTED = "admitted"
    UNAUTHORIZED = "unauthorized"  # 401
    FORBIDDEN = "forbidden"  # 403
    NOT_FOUND = "not_found"  # 404
    REFUSED = "refused"  # 429
    UNAVAILABLE = "unavailable"  # 503: store down, fail closed
    ADMITTED_UNMETERED = "admitted_unmetered"  # store down, fail open


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    decision: Decision
    feature: Feature | None = None
    customer: Customer | None = None
    plan: Plan | None = None
    limits: tuple[LimitState, ...] = ()
    store_time: float = 0.0
    spec: ChargeSpec | None = None  # what the admitted request charges; its measured meters come later
    credits: tuple[CreditState, ...] = ()
    hold_id: str = ""  # the reservation to settle when the response ends ("" when none was made)
    unrecorded: MeterRequest | None = None  # admitted with the store down: for the local journal
    # The metering call was sent and never answered (it may have run): the journal merges the
    # unrecorded usage only if it did not (open), or undoes the call if it did (closed, a 503).
    unanswered: UnansweredCall | None = None

    @property
    def forwards(self) -> bool:
        # Identity tests, not a set: hashing an enum member is a Python-level call.
        decision = self.decision
        return (
            decision is Decision.ADMITTED
            or decision is Decision.PUBLIC
            or decision is Decision.ADMITTED_UNMETERED
        )

    @property
    def recorded_usage(self) -> bool:
        """The admission call added this request's request-time usage to a billing summary."""
        return self.decision is Decision.ADMITTED and self.spec is not None and bool(self.spec.usage)

    @property
    def refusing(self) -> tuple[LimitState, ...]:
        """Limits that refused the request (enforced and over)."""
        return tuple(s for s in self.limits if s.over and s.charge.enforced)

    @property
    def refusing_credits(self) -> tuple[CreditState, ...]:
        """Prepaid credits too small for the request (enforced and over)."""
        return tuple(c for c in self.credits if c.over and c.charge.enforced)

    @property
    def shadow_refusals(self) -> tuple[LimitState, ...]:
        """Limits that would have refused had they not been shadow limits (or on a shadow plan)."""
        return tuple(
            [
                s
                for s in self.limits
                if s.over and not s.charge.enforced and s.charge.limit.is_hard and not s.charge.allowance
            ]
        )
