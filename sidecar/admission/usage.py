"""The usage document of SPEC §7: a customer's plan and, per limit, used / remaining / reset."""

from __future__ import annotations

from typing import Any

from sidecar.admission.gate import at_store_time
from sidecar.admission.plan import window_for
from sidecar.config.policy.model import Customer, Policy
from sidecar.config.policy.windows import rfc3339
from sidecar.store.port import (
    Admission,
    CreditCharge,
    CreditState,
    LimitCharge,
    LimitState,
    MeterRequest,
    Store,
)


async def usage_document(policy: Policy, store: Store, customer: Customer) -> dict[str, Any]:
    """Reads every limit and prepaid credit of the customer's plan without charging anything."""
    admission = await _read(policy, store, customer)
    return {
        "customer": customer.id,
        "plan": customer.plan,
        "limits": [limit_row(state, admission.store_time) for state in admission.limits]
        + [credit_row(state) for state in admission.credits],
    }


async def _read(policy: Policy, store: Store, customer: Customer) -> Admission:
    plan = policy.plans.get(customer.plan)  # a stored customer may name a plan a reload removed
    limits = plan.limits if plan else ()
    credits = tuple(CreditCharge(meter, 0, enforced=False) for meter in (plan.prepaid if plan else ()))

    def request_at(now: float) -> MeterRequest:
        charges = tuple(
            LimitCharge(limit, 0, window_for(limit, now, customer), enforced=False) for limit in limits
        )
        return MeterRequest(customer.id, charges, (), policy.billing_interval, credits)

    return await at_store_time(store, store.read_limits, request_at)


def limit_row(state: LimitState, now: float) -> dict[str, Any]:
    """One limit's row: used, remaining and when its window resets."""
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


def credit_row(state: CreditState) -> dict[str, Any]:
    """Credit in force: granted (limit), drawn (used) and left (remaining, below zero by at most
    what requests in flight used); it does not reset."""
    return {
        "meter": state.charge.meter,
        "period": "prepaid",
        "feature": None,
        "limit": state.granted,
        "used": state.used,
        "remaining": state.balance,
        "reset": None,
    }
