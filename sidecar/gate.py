"""Admission as plain async code: route → identity → entitlement → atomic check-and-meter → Verdict.

Nothing here knows HTTP beyond a method, a path and a header mapping; problems.py turns a Verdict
into a status code.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.charges import meter_request
from sidecar.errors import StoreUnavailable, UnansweredCall
from sidecar.identity import CustomerLookup, identify
from sidecar.measure import reserve_amount
from sidecar.policy.model import ChargeSpec, Customer, Feature, Plan, Policy, StoreFailure
from sidecar.store.base import Admission, CreditState, LimitState, MeterRequest, Outcome, Store

if TYPE_CHECKING:
    from sidecar.denials import DenyCache

# A calendar window can be stale only when a boundary passes between reading the clock and the
# script running; two retries cover a clock estimate that was off by a whole window.
_STALE_RETRIES = 2


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
    customer = identify(headers, policy, customers)
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
