"""Would it be admitted now? POST /admin/customers/{id}/check (SPEC §7), for work that does not
pass through the proxy: the usage document's rows for the limits and credit it would touch, plus
``allowed``. One read of the store (read_limits.lua); nothing is recorded or held, so the answer
can be overtaken by the next request: enforce the work itself with an enforced usage record.

Two questions, by what the body names:

* ``{"feature": F}``, optionally with ``costs``: would a proxied request of F be admitted? Its
  limits as admission checks them (rate limits included), each meter's amount the request's
  cost, or the one in ``costs``; a meter measured from the response needs one unit left, or the
  cost given for it.
* ``{"costs": {meter: amount}}`` alone: would an enforced usage record of each be accepted? The
  meters' day/week/month quotas and credit, as records charge them (admission/records.py).

The rule is admission's: a limit refuses when it is enforced and has less room than the amount
(at least one unit); credit when allowances and balance together do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.admission.gate import at_store_time
from sidecar.admission.plan import window_for
from sidecar.admission.records import usage_request
from sidecar.admission.usage import credit_row, limit_row
from sidecar.config.policy.model import Aggregation, ChargeSpec, Customer, Feature, Plan, Policy
from sidecar.store.port import (
    Admission,
    CreditCharge,
    CreditState,
    LimitCharge,
    LimitState,
    MeterRequest,
    Store,
)

_FIELDS = ("feature", "costs")


@dataclass(frozen=True, slots=True)
class Question:
    feature: Feature | None
    costs: Mapping[str, int]


def parse_question(body: object, policy: Policy) -> Question | list[str]:
    """The question a check's body asks, or every problem with it."""
    if not isinstance(body, dict) or not ("feature" in body or "costs" in body):
        return ['expected a JSON object with "feature" (a feature name), "costs" ({meter: amount}) or both']
    problems = [f"unknown field '{name}'" for name in body if name not in _FIELDS]
    feature = _feature(body.get("feature"), policy, problems)
    costs = _costs(body.get("costs", {}), policy, problems, by_records=feature is None)
    return problems or Question(feature, costs)


def _feature(name: object, policy: Policy, problems: list[str]) -> Feature | None:
    if name is None:
        return None
    found = next((f for f in policy.features if f.name == name), None)
    if found is None:
        problems.append(f"feature must name a feature of the policy, got {name!r}")
    return found


def _costs(costs: object, policy: Policy, problems: list[str], *, by_records: bool) -> dict[str, int]:
    if not isinstance(costs, dict):
        problems.append("costs must be an object of meter names to whole amounts >= 0")
        return {}
    for meter, amount in costs.items():
        known = policy.meters.get(meter)
        if known is None:
            problems.append(f"costs: no meter '{meter}'")
        elif by_records and known.aggregation not in (Aggregation.COUNT, Aggregation.SUM):
            problems.append(f"costs: meter '{meter}' ({known.aggregation.value}) has no quota to check")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            problems.append(f"costs.{meter} must be a whole number >= 0, got {amount!r}")
    return costs


async def check(policy: Policy, store: Store, customer: Customer, question: Question) -> dict[str, Any]:
    """The answer: ``allowed``, the limits that would refuse (``violated-policies``) and the
    rows of every limit and credit looked at. Raises StoreUnavailable."""
    answer: dict[str, Any] = {"customer": customer.id, "plan": customer.plan}
    answer["feature"] = question.feature.name if question.feature else None
    plan = policy.plans.get(customer.plan)
    reason = _not_metered(plan, question.feature)
    if plan is None or reason is not None:
        return answer | {"allowed": reason == "", "violated-policies": [], "limits": [], "detail": reason}
    build = _builder(policy, customer, plan, question)
    admission = await at_store_time(store, store.read_limits, build)
    refusing = _refusing(admission)
    rows = [limit_row(s, admission.store_time) for s in admission.limits] + [
        credit_row(c) for c in admission.credits
    ]
    return answer | {"allowed": not refusing, "violated-policies": refusing, "limits": rows}


def _not_metered(plan: Plan | None, feature: Feature | None) -> str | None:
    """Why the answer needs no store: "" when nothing is metered (allowed), a refusal otherwise."""
    if plan is None:
        return "the customer's plan is not in the policy"
    if feature is not None and feature.public:
        return ""
    if feature is not None and not plan.entitles(feature.name):
        return f"plan '{plan.name}' does not include feature '{feature.name}'"
    return None


def _builder(
    policy: Policy, customer: Customer, plan: Plan, question: Question
) -> Callable[[float], MeterRequest]:
    if question.feature is not None:
        spec = policy.charges[(plan.name, question.feature.name)]
        return lambda now: _request_of(spec, customer, question.costs, now, policy.billing_interval)
    return lambda now: _records_of(policy, customer, plan, question.costs, now)


def _request_of(
    spec: ChargeSpec, customer: Customer, costs: Mapping[str, int], now: float, interval: int
) -> MeterRequest:
    """A proxied request of the feature, with the costs given."""
    limits = tuple(
        LimitCharge(
            s.limit,
            costs.get(s.limit.meter, s.amount),
            window_for(s.limit, now, customer),
            s.enforced,
            s.counts_requests,
            s.allowance,
        )
        for s in spec.limits
    )
    credits = tuple(
        CreditCharge(c.meter.name, costs.get(c.meter.name, c.amount), c.enforced, c.allowances)
        for c in spec.credits
    )
    return MeterRequest(customer.id, limits, (), interval, credits)


def _records_of(
    policy: Policy, customer: Customer, plan: Plan, costs: Mapping[str, int], now: float
) -> MeterRequest:
    """One usage record per meter costed, as records charge them, in one read."""
    limits: list[LimitCharge] = []
    credits: list[CreditCharge] = []
    for name, amount in costs.items():
        one = usage_request(policy, customer, plan, policy.meters[name], now, amount)
        shifted = [tuple(i + len(limits) for i in c.allowances) for c in one.credits]
        credits += [dataclasses.replace(c, allowances=a) for c, a in zip(one.credits, shifted, strict=True)]
        limits += one.limits
    return MeterRequest(customer.id, tuple(limits), (), policy.billing_interval, tuple(credits))


def _refusing(admission: Admission) -> list[str]:
    refusing = [s.charge.limit.name for s in admission.limits if _no_room(s)]
    return refusing + [c.charge.name for c in admission.credits if _no_credit(c, admission.limits)]


def _no_room(state: LimitState) -> bool:
    charge = state.charge
    return charge.enforced and state.used + max(charge.amount, 1) > charge.limit.ceiling


def _no_credit(state: CreditState, limits: tuple[LimitState, ...]) -> bool:
    charge = state.charge
    rooms = [max(0, limits[i].charge.limit.ceiling - limits[i].used) for i in charge.allowances]
    return charge.enforced and max(charge.amount, 1) > min(rooms, default=0) + state.balance
