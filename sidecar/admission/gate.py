"""Admission as plain async code: route → identity → entitlement → atomic check-and-meter → Verdict.

Nothing here knows HTTP beyond a method, a path and a header mapping; problems.py turns a Verdict
into a status code.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping

from sidecar.admission.deny_cache import DenyCache
from sidecar.admission.identity import CustomerLookup, identify
from sidecar.admission.plan import meter_request
from sidecar.admission.sources import reserve_amount
from sidecar.admission.verdict import Decision, Verdict
from sidecar.config.policy.model import ChargeSpec, Customer, Feature, Plan, Policy, StoreFailure
from sidecar.errors import StoreUnavailable
from sidecar.store.port import Admission, MeterRequest, Outcome, Store

# A calendar window can be stale only when a boundary passes between reading the clock and the
# script running; two retries cover a clock estimate that was off by a whole window.
_STALE_RETRIES = 2


async def _no_body() -> bytes | None:
    return None


async def admit(
    policy: Policy,
    customers: CustomerLookup,
    store: Store,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: Callable[[], Awaitable[bytes | None]] = _no_body,
    denials: DenyCache | None = None,
) -> Verdict:
    """Decide one request. Only the check-and-meter step does I/O: one store round trip (and,
    when a reserve reads the request's JSON, reading the request body first); none when
    `denials` knows the customer is still over a hard limit for this feature."""
    feature = policy.routes.feature_for(method, path)
    if feature is None:
        return Verdict(decision=Decision.NOT_FOUND)
    if feature.public:
        return Verdict(decision=Decision.PUBLIC, feature=feature)
    try:
        customer = await identify(headers, policy, customers)
    except StoreUnavailable:  # an unknown key, and the store could not say whose it is
        return Verdict(decision=Decision.UNAVAILABLE, feature=feature)
    if customer is None:
        return Verdict(decision=Decision.UNAUTHORIZED, feature=feature)
    plan = policy.plans.get(customer.plan)  # a stored customer may name a plan a reload removed
    if plan is None or not plan.entitles(feature.name):
        return Verdict(decision=Decision.FORBIDDEN, feature=feature, customer=customer, plan=plan)
    spec = policy.charges[(plan.name, feature.name)]
    if denials is not None and (known := denials.known(policy, customer, feature)) is not None:
        return known
    reserved = await _reservations(spec, headers, body) if spec.reserves else {}
    verdict = await _meter(policy, store, customer, plan, feature, spec, reserved)
    if denials is not None and verdict.decision is Decision.REFUSED:
        denials.note(policy, verdict)
    return verdict


async def _reservations(
    spec: ChargeSpec, headers: Mapping[str, str], body: Callable[[], Awaitable[bytes | None]]
) -> dict[str, int]:
    """What each reserving meter holds for this request."""
    content = await body() if spec.reads_request_json else None
    return {m.name: reserve_amount(m.reserve, headers, content) for m in spec.reserves if m.reserve}


async def _meter(
    policy: Policy,
    store: Store,
    customer: Customer,
    plan: Plan,
    feature: Feature,
    spec: ChargeSpec,
    reserved: Mapping[str, int],
) -> Verdict:
    if not spec.limits and not spec.credits and not (spec.usage and policy.billing):
        # Nothing to check at admission; measured meters are still charged later.
        return Verdict(decision=Decision.ADMITTED, feature=feature, customer=customer, plan=plan, spec=spec)
    hold_id = secrets.token_hex(8) if any(reserved.values()) else ""
    try:
        admission = await at_store_time(
            store,
            store.check_and_meter,
            lambda now: meter_request(policy, customer, feature.name, spec, now, reserved, hold_id),
        )
    except StoreUnavailable as error:
        failure = plan.store_failure or policy.store_failure
        if failure is StoreFailure.OPEN:
            # Its request-time usage goes to the journal; measured meters are charged at the end.
            return Verdict(
                decision=Decision.ADMITTED_UNMETERED,
                feature=feature,
                customer=customer,
                plan=plan,
                spec=spec,
                unrecorded=meter_request(policy, customer, feature.name, spec, store.time()),
                unanswered=error.call,
            )
        return Verdict(
            decision=Decision.UNAVAILABLE,
            feature=feature,
            customer=customer,
            plan=plan,
            unanswered=error.call,
        )
    decision = Decision.REFUSED if admission.outcome is Outcome.REFUSED else Decision.ADMITTED
    return Verdict(
        decision=decision,
        feature=feature,
        customer=customer,
        plan=plan,
        limits=admission.limits,
        store_time=admission.store_time,
        spec=spec,
        credits=admission.credits,
        hold_id=hold_id if decision is Decision.ADMITTED else "",
    )


async def at_store_time(
    store: Store,
    operation: Callable[[MeterRequest], Awaitable[Admission]],
    build: Callable[[float], MeterRequest],
) -> Admission:
    """Build the request for the store's clock as last seen; rebuild if a window boundary passed."""
    now = store.time()
    for _ in range(_STALE_RETRIES + 1):
        admission = await operation(build(now))
        if admission.outcome is not Outcome.STALE:
            return admission
        now = admission.store_time
    raise StoreUnavailable("calendar windows stayed stale; the store's clock is moving backwards")
