"""The usage document of SPEC §7: a customer's plan and, per limit, used / remaining / reset."""

from __future__ import annotations

from typing import Any

from sidecar.charges import window_for
from sidecar.gate import at_store_time
from sidecar.policy.model import Customer, Policy
from sidecar.policy.windows import rfc3339
from sidecar.store.base import Admission, LimitCharge, LimitState, MeterRequest, Store


async def usage_document(policy: Policy, store: Store, customer: Customer) -> dict[str, Any]:
    """Reads every limit of the customer's plan without charging anything."""
    admission = await _read(policy, store, customer)
    return {
        "customer": customer.id,
        "plan": customer.plan,
        "limits": [_row(state, admission.store_time) for state in admission.limits],
    }


async def _read(policy: Policy, store: Store, customer: Customer) -> Admission:
    plan = policy.plans.get(customer.plan)  # a stored customer may name a plan a reload removed
    limits = plan.limits if plan else ()

    def charges_at(now: float) -> tuple[LimitCharge, ...]:
        return tuple(
            LimitCharge(limit, 0, window_for(limit, now, customer), enforced=False) for limit in limits
        )

    return await at_store_time(
        store,
        lambda request: store.read_limits(customer.id, request.limits),
        lambda now: MeterRequest(customer.id, charges_at(now), (), policy.billing_interval),
    )


def _row(state: LimitState, now: float) -> dict[str, Any]:
    limit = state.charge.limit
    window = state.charge.window
    reset = window[1] if window else now + state.reset_seconds
    return {
        "meter": limit.meter,
        "period": limit.period.value,
        "feature": limit.feature,
        "limit": limit.ceiling,
        "used": state.used,
        "remaining": state.remaining,
        "reset": rfc3339(reset),
    }
