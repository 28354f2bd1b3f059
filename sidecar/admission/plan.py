"""Pure: the store request for one admitted route, with calendar windows filled in for `now`."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date

from sidecar.admission import algorithms
from sidecar.config.policy.model import Aggregation, ChargeSpec, Customer, Limit, LimitSpec, Policy
from sidecar.config.policy.windows import Window
from sidecar.store.port import CreditCharge, Hold, LimitCharge, MeterRequest, UsageCharge

_NOTHING: Mapping[str, int] = {}


def window_for(limit: Limit, now: float, customer: Customer) -> Window | None:
    """The window a charge to ``limit`` names (algorithms.py): a calendar quota's day, week or
    month; None for a moving window."""
    return algorithms.window(limit, now, customer.billing_anchor)


def meter_request(
    policy: Policy,
    customer: Customer,
    feature: str,
    spec: ChargeSpec,
    now: float,
    reserved: Mapping[str, int] = _NOTHING,
    hold_id: str = "",
) -> MeterRequest:
    """Limits and credits to check, and usage to record (only when billing is configured).

    ``reserved`` maps a measured meter to the amount this request holds until it settles under
    ``hold_id``; an amount of 0 holds nothing and admits while the balance is above zero.
    """
    holding = any(reserved.values())
    if holding:
        limits = tuple([_reserving(s, now, customer, reserved) for s in spec.limits])
    else:
        anchor = customer.billing_anchor
        limits = tuple([_fixed(s, now, anchor) for s in spec.limits])
    credits = tuple(
        [
            CreditCharge(
                c.meter.name,
                c.amount or reserved.get(c.meter.name, 0),
                c.enforced,
                c.allowances,
                reserved.get(c.meter.name, 0) > 0,
                c.meter.counts_requests,
            )
            for c in spec.credits
        ]
    )
    usage = (
        tuple([UsageCharge(meter, feature, amount, "+") for meter, amount in spec.usage])
        if policy.billing
        else ()
    )
    hold = _hold(spec, hold_id) if holding else None
    holds = bool(spec.credits or spec.reserves)
    thresholds = watched_thresholds(policy, limits, credits)
    return MeterRequest(
        customer.id, limits, usage, policy.billing_interval, credits, hold, holds, customer.plan, thresholds
    )


def watched_thresholds(
    policy: Policy, limits: tuple[LimitCharge, ...], credits: tuple[CreditCharge, ...]
) -> tuple[int, ...]:
    """The thresholds a metering call watches (SPEC §9): the policy's, when it charges a limit or a
    credit; none when notifications are off (the store then sends no notification block)."""
    notifications = policy.notifications
    return notifications.thresholds if notifications is not None and (limits or credits) else ()


# Windows remembered per limit: a month limit has at most 31 current windows (one per anchor day),
# so this is reached only when time has moved on through many windows; then it starts afresh.
_WINDOWS_REMEMBERED = 64


def _fixed(spec: LimitSpec, now: float, anchor: date | None) -> LimitCharge:
    """A request that reserves nothing adds the same to a limit as every other one in the same
    window, so the LimitCharge is built once per window (spec.charges) and shared."""
    limit = spec.limit
    window = algorithms.window(limit, now, anchor)
    charge = spec.charges.get(window)
    if not isinstance(charge, LimitCharge):
        if len(spec.charges) >= _WINDOWS_REMEMBERED:
            spec.charges.clear()
        charge = LimitCharge(limit, spec.amount, window, spec.enforced, spec.counts_requests, spec.allowance)
        spec.charges[window] = charge
    return charge


def _reserving(spec: LimitSpec, now: float, customer: Customer, reserved: Mapping[str, int]) -> LimitCharge:
    held = reserved.get(spec.limit.meter, 0)
    return LimitCharge(
        spec.limit,
        spec.amount or held,
        window_for(spec.limit, now, customer),
        spec.enforced,
        spec.counts_requests,
        spec.allowance,
        held > 0,
    )


def _hold(spec: ChargeSpec, hold_id: str) -> Hold:
    ttl = max(m.reserve.ttl for m in spec.reserves if m.reserve is not None)
    return Hold(hold_id, ttl)


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
    hold_id: str = "",
) -> MeterRequest:
    """What the response told, charged to the limits and credits on those meters and recorded for
    billing; `distinct` holds the values unique meters saw. ``hold_id`` names the reservation the
    real amounts replace (with no amount for a reserved meter, the reservation is just released)."""
    positions: dict[int, int] = {}
    limits: list[LimitCharge] = []
    for index, s in enumerate(spec.limits):
        amount = amounts.get(s.limit.meter, 0)
        if s.amount == 0 and amount > 0:
            positions[index] = len(limits)
            window = window_for(s.limit, now, customer)
            limits.append(LimitCharge(s.limit, amount, window, s.enforced, False, s.allowance))
    credits = tuple(
        CreditCharge(
            c.meter.name,
            amounts[c.meter.name],
            c.enforced,
            tuple(positions[i] for i in c.allowances),
            counts_requests=c.meter.counts_requests,
        )
        for c in spec.credits
        if c.amount == 0 and amounts.get(c.meter.name, 0) > 0
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
    hold = Hold(hold_id, 0) if hold_id else None
    holds = bool(spec.credits or spec.reserves)
    charged = tuple(limits)
    thresholds = watched_thresholds(policy, charged, credits)
    return MeterRequest(
        customer.id, charged, usage, policy.billing_interval, credits, hold, holds, customer.plan, thresholds
    )
