"""Pure: the store request for one admitted route, with calendar windows filled in for `now`."""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.policy.model import Aggregation, ChargeSpec, Customer, Limit, Policy
from sidecar.policy.windows import Window, calendar_window
from sidecar.store.base import LimitCharge, MeterRequest, UsageCharge


def window_for(limit: Limit, now: float, customer: Customer) -> Window | None:
    """The calendar window of a day/week/month limit; None for a moving (rate) window."""
    if limit.period.is_rate:
        return None
    return calendar_window(limit.period, now, customer.billing_anchor)


def meter_request(
    policy: Policy, customer: Customer, feature: str, spec: ChargeSpec, now: float
) -> MeterRequest:
    """Limits to check and usage to record; usage is recorded only when billing is configured."""
    limits = tuple(
        LimitCharge(s.limit, s.amount, window_for(s.limit, now, customer), s.enforced, s.counts_requests)
        for s in spec.limits
    )
    usage = (
        tuple(UsageCharge(meter, feature, amount, "+") for meter, amount in spec.usage)
        if policy.billing
        else ()
    )
    return MeterRequest(customer.id, limits, usage, policy.billing_interval)


_USAGE_OPS = {
    Aggregation.COUNT: "+",
    Aggregation.SUM: "+",
    Aggregation.MAX: "max",
    Aggregation.MIN: "min",
    Aggregation.UNIQUE: "uniq",
}


def response_request(
    policy: Policy,
    customer: Customer,
    feature: str,
    spec: ChargeSpec,
    amounts: Mapping[str, int],
    now: float,
    distinct: Mapping[str, str] | None = None,
) -> MeterRequest:
    """What the response told, charged to the limits on those meters and recorded for billing;
    `distinct` holds the values unique meters saw."""
    limits = tuple(
        LimitCharge(s.limit, amounts[s.limit.meter], window_for(s.limit, now, customer), s.enforced, False)
        for s in spec.limits
        if s.amount == 0 and amounts.get(s.limit.meter, 0) > 0
    )
    usage = (
        tuple(
            UsageCharge(meter.name, feature, amounts[meter.name], _USAGE_OPS[meter.aggregation])
            for meter in spec.measured
            if meter.name in amounts and (amounts[meter.name] > 0 or _USAGE_OPS[meter.aggregation] != "+")
        )
        + tuple(UsageCharge(meter, feature, 1, "uniq", value) for meter, value in (distinct or {}).items())
        if policy.billing
        else ()
    )
    return MeterRequest(customer.id, limits, usage, policy.billing_interval)
