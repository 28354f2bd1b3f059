"""Prepaid credit grants from the admin API: POST /admin/customers/{id}/grants.

A grant is ``{"id", "meter", "amount", "expires_at"?}``. The id is the caller's (an order or
invoice number, say): a retried grant with the same id and content counts once, and the same id
with different content is refused (409), so a client bug cannot silently change a grant.
``expires_at`` is an RFC 3339 time or unix seconds; without it the grant never expires.
"""

from __future__ import annotations

from datetime import datetime

from sidecar.admission.customers import CUSTOMER_ID
from sidecar.config.policy.model import Policy
from sidecar.store.port import Grant

_FIELDS = ("id", "meter", "amount", "expires_at")


def parse_grant(body: object, policy: Policy, now: float) -> Grant | list[str]:
    """A validated grant, or every problem with the request body."""
    if not isinstance(body, dict):
        return ["expected a JSON object with id, meter, amount and optionally expires_at"]
    problems = [f"unknown field '{name}'" for name in body if name not in _FIELDS]
    grant_id, meter, amount = body.get("id"), body.get("meter"), body.get("amount")
    if not isinstance(grant_id, str) or not CUSTOMER_ID.fullmatch(grant_id):
        problems.append("id must be a string of letters, digits and . _ : @ - (at most 128 characters)")
    prepaid = sorted({name for plan in policy.plans.values() for name in plan.prepaid})
    if not isinstance(meter, str) or meter not in prepaid:
        choices = ", ".join(prepaid) or "none: no plan has prepaid meters"
        problems.append(f"meter must be a prepaid meter of some plan ({choices})")
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
        problems.append("amount must be a whole number >= 1")
    expires_at = _expiry(body.get("expires_at"), now, problems)
    if problems or not isinstance(grant_id, str) or not isinstance(meter, str) or not isinstance(amount, int):
        return problems
    return Grant(id=grant_id, meter=meter, amount=amount, expires_at=expires_at)


def _expiry(value: object, now: float, problems: list[str]) -> int | None:
    if value is None:
        return None
    seconds: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            seconds = int(parsed.timestamp())
    if seconds is None:
        problems.append(
            "expires_at must be an RFC 3339 time with a zone (2027-01-01T00:00:00Z) or unix seconds"
        )
    elif seconds <= now:
        problems.append("expires_at is in the past: the grant would never count")
    return seconds
