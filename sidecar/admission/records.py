"""Usage records (SPEC §8): a CloudEvent read into what the store counts, or why it cannot be.

The envelope is the one OpenMeter ingests, so an emitter written for it works unchanged:
``subject`` names the customer, ``type`` the meter, ``time`` when the usage happened (the arrival
when absent), ``data.value`` the amount (1 for a ``count`` meter when absent); other ``data``
members are metadata, accepted and not kept. ``source`` and ``id`` identify the record: their
digest is the key the store remembers it by (``dedupe_key``). A top-level ``enforce: true``
makes the store check it all or nothing.

What a record charges (``usage_request``) is decided here, once per (plan, meter) and policy:
the meter's day/week/month quotas that are not scoped to a feature, in the windows the record's
time falls in; its prepaid credit, allowances first; and the billing summary of the window its
time falls in. Rate limits (second/minute/hour) never take records: they pace requests, and a
record reports usage that already happened, often in a batch. Records name no feature, so the
summaries they feed have the feature "" and feature-scoped limits do not count them.

Pure: nothing here does I/O or reads a clock; ``now`` is the store's time as last seen.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from sidecar.admission import algorithms
from sidecar.admission.plan import watched_thresholds
from sidecar.config.policy.events import MAX_AHEAD_SECONDS
from sidecar.config.policy.model import Aggregation, Customer, Limit, Meter, Plan, Policy
from sidecar.store.port import CreditCharge, Dedupe, LimitCharge, MeterRequest, UsageCharge, UsageRecord

RECORD_FEATURE = ""  # the feature of the billing summaries records feed: they name none
SPEC_VERSION = "1.0"
MAX_VALUE = 2**53 - 1  # exact in Lua's numbers, which the store's scripts count in
_OPS = {Aggregation.COUNT: "+", Aggregation.SUM: "+", Aggregation.MAX: "max", Aggregation.MIN: "min"}
_ADDS = (Aggregation.COUNT, Aggregation.SUM)
_FLAGS: Mapping[object, bool] = {True: True, False: False, "true": True, "false": False}


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a record cannot be counted: the field at fault and what is wrong with it."""

    field: str
    reason: str


@dataclass(frozen=True, slots=True)
class Event:
    """A valid usage record."""

    id: str
    source: str
    customer: Customer
    plan: Plan
    meter: Meter
    at: float
    amount: int
    enforce: bool


CustomerLookup = Callable[[str], Customer | None]


class Envelope(NamedTuple):
    id: str
    source: str
    subject: str
    type: str


def read_event(raw: object, policy: Policy, customers: CustomerLookup, now: float) -> Event | Invalid:
    """The record ``raw`` (one decoded CloudEvent) describes, or the first thing wrong with it."""
    if not isinstance(raw, dict):
        return Invalid("", "a record must be a JSON object (a CloudEvent)")
    envelope = _envelope(raw)
    if isinstance(envelope, Invalid):
        return envelope
    found = _customer(envelope.subject, policy, customers)
    if isinstance(found, Invalid):
        return found
    meter = _meter(envelope.type, policy)
    if isinstance(meter, Invalid):
        return meter
    return _event(raw, envelope, found, meter, policy.events.max_age_seconds, now)


def _event(
    raw: dict[str, object],
    envelope: Envelope,
    found: tuple[Customer, Plan],
    meter: Meter,
    max_age: int,
    now: float,
) -> Event | Invalid:
    at = _time(raw.get("time"), now, max_age)
    if isinstance(at, Invalid):
        return at
    amount = _amount(raw.get("data"), meter)
    if isinstance(amount, Invalid):
        return amount
    enforce = _FLAGS.get(raw.get("enforce", False))
    if enforce is None:
        return Invalid("enforce", f"expected true or false, got {_shown(raw.get('enforce'))}")
    customer, plan = found
    return Event(envelope.id, envelope.source, customer, plan, meter, at, amount, enforce)


def _envelope(raw: dict[str, object]) -> Envelope | Invalid:
    if raw.get("specversion") != SPEC_VERSION:
        return Invalid("specversion", f"expected '{SPEC_VERSION}', got {_shown(raw.get('specversion'))}")
    values = []
    for name in Envelope._fields:
        value = raw.get(name)
        if not isinstance(value, str) or not value:
            return Invalid(name, f"required: a non-empty string, got {_shown(value)}")
        values.append(value)
    return Envelope(*values)


def _customer(subject: str, policy: Policy, customers: CustomerLookup) -> tuple[Customer, Plan] | Invalid:
    customer = customers(subject)
    if customer is None:
        return Invalid("subject", f"no customer '{subject}'")
    plan = policy.plans.get(customer.plan)
    if plan is None:
        return Invalid(
            "subject", f"customer '{subject}' is on plan '{customer.plan}', which no policy defines"
        )
    return customer, plan


def _meter(name: str, policy: Policy) -> Meter | Invalid:
    meter = policy.meters.get(name)
    if meter is None:
        return Invalid("type", f"no meter '{name}'; a record's type names the meter it adds to")
    if meter.aggregation not in _OPS:
        return Invalid("type", f"meter '{name}' counts distinct values, which records do not carry")
    return meter


def _time(value: object, now: float, max_age: int) -> float | Invalid:
    """When the usage happened: an RFC 3339 time with a zone, no older than ``max_age`` seconds
    and no more than MAX_AHEAD_SECONDS ahead of the store's clock; the arrival when absent."""
    if value is None:
        return now
    at = _rfc3339(value)
    if at is None:
        return Invalid(
            "time", f"expected an RFC 3339 time with a zone (2026-01-01T00:00:00Z), got {_shown(value)}"
        )
    if at < now - max_age:
        return Invalid("time", f"{value} is older than {max_age // 86400} days (events.max_age_days)")
    if at > now + MAX_AHEAD_SECONDS:
        return Invalid(
            "time", f"{value} is more than {MAX_AHEAD_SECONDS // 60} minutes ahead of the store's clock"
        )
    return at


def _rfc3339(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return None if moment.tzinfo is None else moment.timestamp()


def _amount(data: object, meter: Meter) -> int | Invalid:
    if data is not None and not isinstance(data, dict):
        return Invalid("data", f"expected a JSON object, got {_shown(data)}")
    value = None if data is None else data.get("value")
    if value is None:
        if meter.aggregation is Aggregation.COUNT:
            return 1
        return Invalid(
            "data.value", f"required: meter '{meter.name}' ({meter.aggregation.value}) takes an amount"
        )
    amount = _whole(value)
    if amount is None or abs(amount) > MAX_VALUE:
        return Invalid("data.value", f"expected a whole number of at most {MAX_VALUE}, got {_shown(value)}")
    if amount < 0 and meter.aggregation in _ADDS:
        return Invalid(
            "data.value", f"must not be negative: meter '{meter.name}' ({meter.aggregation.value}) adds up"
        )
    return amount


def _whole(value: object) -> int | None:
    """A JSON number or a decimal string (OpenMeter emitters send both) that is a whole number."""
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text[:1] == "-" else text
        return int(text) if digits.isdecimal() and len(digits) <= 16 else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def dedupe_key(source: str, event_id: str) -> bytes:
    """12 bytes of the SHA-1 of source and id (length-prefixed, so no two pairs run together):
    what the store remembers a record by. A false duplicate needs a 96-bit collision within one
    customer's dedupe window."""
    text = f"{len(source)}:{source}{event_id}".encode("utf-8", "surrogatepass")
    return hashlib.sha1(text).digest()[:12]


def usage_record(policy: Policy, event: Event, *, enforce: bool = False) -> UsageRecord:
    """What the store counts for ``event``; ``enforce`` (a query's) adds to the record's own."""
    dedupe = Dedupe(dedupe_key(event.source, event.id), policy.events.dedupe_seconds)
    return UsageRecord(dedupe, event.at, _memo(policy).request(event), event.enforce or enforce)


def usage_request(
    policy: Policy, customer: Customer, plan: Plan, meter: Meter, at: float, amount: int
) -> MeterRequest:
    """The quotas, credit and billing usage one record of ``amount`` at ``at`` adds to."""
    spec = _memo(policy).spec(plan, meter)
    anchor = customer.billing_anchor
    limits = tuple(
        LimitCharge(
            limit, amount, algorithms.window(limit, at, anchor), enforced, meter.counts_requests, allowance
        )
        for limit, enforced, allowance in spec.limits
    )
    credits: tuple[CreditCharge, ...] = ()
    if spec.credit is not None:
        enforced, allowances = spec.credit
        credits = (
            CreditCharge(meter.name, amount, enforced, allowances, counts_requests=meter.counts_requests),
        )
    usage = (
        (UsageCharge(meter.name, RECORD_FEATURE, amount, _OPS[meter.aggregation]),) if policy.billing else ()
    )
    thresholds = watched_thresholds(policy, limits, credits)
    return MeterRequest(
        customer.id, limits, usage, policy.billing_interval, credits, plan=plan.name, thresholds=thresholds
    )


@dataclass(frozen=True, slots=True)
class _Spec:
    """What a record of one meter charges on one plan: (limit, enforced, allowance) per calendar
    quota, and (enforced, allowance indexes) of its prepaid credit."""

    limits: tuple[tuple[Limit, bool, bool], ...]
    credit: tuple[bool, tuple[int, ...]] | None


class _Memo:
    """What records charge under one policy: a spec per (plan, meter), and the request per
    (customer, meter, amount, UTC day). Every calendar window starts and ends at 00:00 UTC (a
    month on its anchor day), so a customer's records of one amount on one day share one request,
    which the store then encodes once (store/redis/records.py)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.specs: dict[tuple[str, str], _Spec] = {}
        self.requests: dict[tuple[object, ...], MeterRequest] = {}

    def spec(self, plan: Plan, meter: Meter) -> _Spec:
        spec = self.specs.get((plan.name, meter.name))
        if spec is None:
            spec = self.specs[(plan.name, meter.name)] = _build_spec(plan, meter)
        return spec

    def request(self, event: Event) -> MeterRequest:
        customer, meter = event.customer, event.meter
        key = (
            customer.id,
            customer.plan,
            customer.billing_anchor,
            meter.name,
            event.amount,
            int(event.at) // 86400,
        )
        request = self.requests.get(key)
        if request is None:
            if len(self.requests) >= REQUESTS_KEPT:
                self.requests.clear()
            request = usage_request(self.policy, customer, event.plan, meter, event.at, event.amount)
            self.requests[key] = request
        return request


REQUESTS_KEPT = 100_000  # past it, the memo starts afresh
_MEMO: list[_Memo] = []  # the memo of the policy in force; a reload starts afresh


def _memo(policy: Policy) -> _Memo:
    if not _MEMO or _MEMO[0].policy is not policy:
        _MEMO[:] = [_Memo(policy)]
    return _MEMO[0]


def _build_spec(plan: Plan, meter: Meter) -> _Spec:
    prepaid = meter.name in plan.prepaid
    limits = []
    for limit in plan.limits:
        if limit.meter == meter.name and limit.algorithm.calendar and limit.feature is None:
            allowance = prepaid
            enforced = limit.is_hard and not limit.shadow and not plan.shadow and not allowance
            limits.append((limit, enforced, allowance))
    allowances = tuple(i for i, (_, _, allowance) in enumerate(limits) if allowance)
    credit = (not plan.shadow, allowances) if prepaid else None
    return _Spec(tuple(limits), credit)
