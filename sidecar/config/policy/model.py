"""The policy as frozen, typed objects: what the loader produces and the hot path reads.

Nothing here parses YAML or reads a clock. A Policy is built once by the loader and never
changed; a reload builds a new one and swaps it in (see holder.py).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from types import MappingProxyType

from sidecar.config.policy.events import Events
from sidecar.config.policy.meter_sources import SOURCE_KINDS
from sidecar.config.policy.meter_sources import Source as Source  # re-exported: the model's vocabulary
from sidecar.config.policy.meter_sources import SourceKind as SourceKind
from sidecar.config.policy.notifications import DEFAULT_HISTORY_DAYS, Notifications
from sidecar.config.policy.routes import RouteTable
from sidecar.config.policy.windows import Period


class Aggregation(enum.Enum):
    COUNT = "count"
    SUM = "sum"
    MAX = "max"
    MIN = "min"
    UNIQUE = "unique"


class OnExceed(enum.Enum):
    REJECT = "reject"
    ALLOW = "allow"


class StoreFailure(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"


class Algorithm(enum.Enum):
    """How a limit counts. The store keeps its state by algorithm (lib.lua's read_limit and
    charge_limit dispatch on it), admission computes its window by it (admission/algorithms.py)
    and the store lays out its arguments by it (store/redis/limit_kinds.py).

    ``calendar``: it counts in UTC calendar windows, so a charge names its window, and on a
    prepaid meter it is the allowance drawn before credit. ``bursts``: ``burst`` may raise it.
    """

    MOVING_WINDOW = "moving_window"  # at most `ceiling` units in any window of the period's length
    CALENDAR_QUOTA = "calendar_quota"  # at most `ceiling` units in each day, week or month

    def __init__(self, value: str) -> None:
        self.calendar = value == "calendar_quota"
        self.bursts = value == "moving_window"

    @classmethod
    def of(cls, period: Period) -> Algorithm:
        """The algorithm a limit of ``period`` uses: a policy names periods, not algorithms."""
        return _PERIOD_ALGORITHMS[period]


_PERIOD_ALGORITHMS = {
    Period.SECOND: Algorithm.MOVING_WINDOW,
    Period.MINUTE: Algorithm.MOVING_WINDOW,
    Period.HOUR: Algorithm.MOVING_WINDOW,
    Period.DAY: Algorithm.CALENDAR_QUOTA,
    Period.WEEK: Algorithm.CALENDAR_QUOTA,
    Period.MONTH: Algorithm.CALENDAR_QUOTA,
}


# What the policy must check for each billing format; the encoders are billing/formats/.
# The field of a customer that names it in the billing system (none: our own customer id).
_CUSTOMER_FIELDS = {"stripe": "stripe_customer_id", "lago": "lago_subscription_id"}
# The most summaries one request may carry (none: the policy's batch_size alone bounds it).
_MAX_BATCH = {"lago": 100}  # POST /api/v1/events/batch refuses more with 422 too_many_events
# How old an event's timestamp (a summary's window start) may be when it arrives, in seconds:
# Stripe takes meter events "within the past 35 calendar days".
_MAX_EVENT_AGE = {"stripe": 35 * 86400}
# Aggregations a system cannot bill from per-window summaries, and why: Stripe's meters only sum,
# count or keep the last event; Lago's billable metrics take no minimum.
_UNBILLABLE = {
    "stripe": (frozenset({"max", "min"}), "Stripe meters only sum, count or keep the last event"),
    "lago": (frozenset({"min"}), "Lago billable metrics take no minimum"),
}


class BillingFormat(enum.Enum):
    """A billing system's wire format, with what the loader and the customer directory check for
    it: ``customer_field`` (the Customer field every customer must fill, or None), ``max_batch``
    (the most summaries in one request, or None), ``max_event_age`` (seconds a summary may take to
    arrive after its window starts, or None) and ``unbillable`` (the meter aggregations it cannot
    bill, with ``unbillable_why``)."""

    JSON = "json"
    STRIPE = "stripe"
    LAGO = "lago"
    OPENMETER = "openmeter"

    def __init__(self, value: str) -> None:
        self.customer_field: str | None = _CUSTOMER_FIELDS.get(value)
        self.max_batch: int | None = _MAX_BATCH.get(value)
        self.max_event_age: int | None = _MAX_EVENT_AGE.get(value)
        self.unbillable, self.unbillable_why = _UNBILLABLE.get(value, (frozenset[str](), ""))


class StripeApi(enum.Enum):
    """Which Stripe ingestion API ``format: stripe`` uses (``billing.stripe_api``): v1 meter
    events, one a request; or the v2 meter event stream, ``max_batch`` events a request."""

    V1 = "v1"
    V2 = "v2"

    def __init__(self, value: str) -> None:
        self.max_batch: int | None = 100 if value == "v2" else None


# billing.namespace when none is given: it enters no summary id (store/summaries.py)
DEFAULT_NAMESPACE = "quota-sidecar"


@dataclass(frozen=True, slots=True, kw_only=True)
class Reserve:
    """What a response-time meter holds at admission, until the response tells the real amount.

    ``source`` (a request header or a request JSON field) gives the amount per request; when it
    is None, or cannot be read from a request, ``amount`` is held. A hold left by a replica that
    died is released by the next admission of that customer once ``ttl`` seconds have passed.
    """

    amount: int
    source: Source | None = None
    ttl: int = 600


@dataclass(frozen=True, slots=True, kw_only=True)
class Meter:
    name: str
    aggregation: Aggregation
    source: Source
    reserve: Reserve | None = None

    @property
    def counts_requests(self) -> bool:
        """A plain request counter: the unit the rate-limit headers assume when none is named."""
        return self.aggregation is Aggregation.COUNT


@dataclass(frozen=True, slots=True, kw_only=True)
class Feature:
    """A named group of routes. ``cost`` maps request-time meters to the amount one request adds."""

    name: str
    method: str | None
    path: str
    public: bool = False
    cost: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """One ceiling on one meter over one period, optionally scoped to one feature."""

    meter: str
    limit: int
    period: Period
    burst: int = 0
    feature: str | None = None
    on_exceed: OnExceed = OnExceed.REJECT
    shadow: bool = False
    # The loader sets it; a Limit built in code without one gets its period's (Algorithm.of).
    algorithm: Algorithm = None  # type: ignore[assignment]
    # Derived once here, not per read: the hot path reads both for every limit of every request.
    # name: what clients see in RateLimit headers and 429 bodies, e.g. requests-month.
    # ceiling: units admitted in one window, the limit plus the burst allowance.
    name: str = field(init=False, repr=False, compare=False)
    ceiling: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.algorithm is None:
            object.__setattr__(self, "algorithm", Algorithm.of(self.period))
        base = f"{self.meter}-{self.period.value}"
        object.__setattr__(self, "name", f"{base}-{self.feature}" if self.feature else base)
        object.__setattr__(self, "ceiling", self.limit + self.burst)

    @property
    def is_hard(self) -> bool:
        """A hard limit refuses; a soft (on_exceed: allow) one only reports overage."""
        return self.on_exceed is OnExceed.REJECT

    def applies_to(self, feature: str) -> bool:
        return self.feature is None or self.feature == feature


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    name: str
    features: frozenset[str]
    limits: tuple[Limit, ...] = ()
    prepaid: tuple[str, ...] = ()
    shadow: bool = False
    store_failure: StoreFailure | None = None

    def entitles(self, feature: str) -> bool:
        return feature in self.features


@dataclass(frozen=True, slots=True, kw_only=True)
class Customer:
    """A customer; ``api_key_hashes`` are hex SHA-256 digests, never the keys themselves."""

    id: str
    plan: str
    api_key_hashes: tuple[str, ...] = ()
    billing_anchor: date | None = None
    stripe_customer_id: str | None = None  # billing format stripe: payload[stripe_customer_id]
    lago_subscription_id: str | None = None  # billing format lago: external_subscription_id


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    api_key_headers: tuple[str, ...] = ("X-API-Key", "Authorization")
    forward_key: bool = False  # pass the key fields on to the upstream (SPEC §4: removed by default)


@dataclass(frozen=True, slots=True, kw_only=True)
class Billing:
    """Where and how usage summaries go. A window is pushed `grace` seconds after it closes.
    ``namespace`` enters every summary id and is the CloudEvents source; ``stripe_api`` chooses
    Stripe's v1 or v2 API."""

    url: str
    format: BillingFormat = BillingFormat.JSON
    interval: int = 60
    grace: int = 5
    batch_size: int = 100
    namespace: str = DEFAULT_NAMESPACE
    stripe_api: StripeApi = StripeApi.V1


DEFAULT_BILLING_INTERVAL = 60


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A limit that applies to one (plan, feature), with what one request adds to it at admission.

    ``amount`` 0 means the meter is measured from the response: the request is admitted while the
    limit has units left (or, when the meter reserves, while the reservation fits), and charged
    when the response ends. An ``allowance`` is a calendar limit on a prepaid meter: it never
    refuses by itself; what it cannot cover is drawn from credit (see CreditSpec).
    """

    limit: Limit
    amount: int
    enforced: bool
    counts_requests: bool
    allowance: bool = False
    # What a request that reserves nothing adds, by calendar window (None when it has none): the
    # same frozen object for every request in that window, so admission does not build it anew.
    # Filled by admission/plan.py, which also bounds it; opaque here (the policy is below the store
    # in the layering, and the values are the store's LimitCharge), not part of the policy's value.
    charges: dict[tuple[int, int] | None, object] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class CreditSpec:
    """A prepaid meter that one (plan, feature) draws on.

    ``amount`` is what a request adds at admission (0 for a measured meter). ``allowances`` are the
    indexes, in ChargeSpec.limits, of the period allowances used before credit.
    """

    meter: Meter
    amount: int
    enforced: bool
    allowances: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ChargeSpec:
    """Everything admission needs for one (plan, feature), resolved once per policy."""

    limits: tuple[LimitSpec, ...]
    usage: tuple[tuple[str, int], ...]  # (meter, amount) recorded for billing at admission
    measured: tuple[Meter, ...] = ()  # meters read from the request/response once it ends
    credits: tuple[CreditSpec, ...] = ()
    reserves: tuple[Meter, ...] = ()  # measured meters that hold an amount at admission

    @property
    def reads_request_json(self) -> bool:
        """A reserve reads the request body, which must then be read before admission."""
        sources = (m.reserve.source for m in self.reserves if m.reserve is not None)
        return any(s is not None and SOURCE_KINDS[s.kind].body for s in sources)


def request_amount(meter: Meter, feature: Feature) -> int:
    """What one request of `feature` adds to a request-time meter: its cost, else 1 for count."""
    default = 1 if meter.aggregation is Aggregation.COUNT else 0
    return feature.cost.get(meter.name, default)


def resolve_charges(
    plan: Plan, feature: Feature, meters: Mapping[str, Meter], *, billing: bool
) -> ChargeSpec:
    """The limits and credits that apply and what the request adds to each. Meters measured at the
    end are read when a limit or credit needs them or, with billing on, for the usage summaries."""
    limits: list[LimitSpec] = []
    for limit in plan.limits:
        if not limit.applies_to(feature.name):
            continue
        meter = meters[limit.meter]
        amount = request_amount(meter, feature) if meter.source.at_request_time else 0
        if meter.source.at_request_time and amount == 0:
            continue
        allowance = meter.name in plan.prepaid and limit.algorithm.calendar
        # An allowance never refuses by itself: its credit does, for what the allowance cannot cover.
        enforced = limit.is_hard and not limit.shadow and not plan.shadow and not allowance
        limits.append(LimitSpec(limit, amount, enforced, meter.counts_requests, allowance))
    credits = []
    for name in plan.prepaid:
        meter = meters[name]
        amount = request_amount(meter, feature) if meter.source.at_request_time else 0
        if meter.source.at_request_time and amount == 0:
            continue  # this feature does not draw on that meter
        allowances = tuple(i for i, spec in enumerate(limits) if spec.allowance and spec.limit.meter == name)
        credits.append(CreditSpec(meter, amount, not plan.shadow, allowances))
    usage = tuple(
        (meter.name, amount)
        for meter in meters.values()
        if meter.source.at_request_time and (amount := request_amount(meter, feature)) > 0
    )
    drawn = {spec.limit.meter for spec in limits} | {credit.meter.name for credit in credits}
    measured = tuple(
        meter for meter in meters.values() if meter.source.measured and (billing or meter.name in drawn)
    )
    reserves = tuple(m for m in measured if m.reserve is not None and m.name in drawn)
    return ChargeSpec(tuple(limits), usage, measured, tuple(credits), reserves)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """A complete, validated policy. Build it with ``Policy.build``, which derives the lookups."""

    identity: Identity
    meters: Mapping[str, Meter]
    features: tuple[Feature, ...]
    plans: Mapping[str, Plan]
    customers: Mapping[str, Customer]
    billing: Billing | None
    store_failure: StoreFailure
    sources: tuple[str, ...]
    routes: RouteTable[Feature]
    customer_by_key_hash: Mapping[str, str]
    charges: Mapping[tuple[str, str], ChargeSpec]
    notifications: Notifications | None = None  # SPEC §9; None: no thresholds are watched
    history_days: int = DEFAULT_HISTORY_DAYS  # days closed summaries are kept as usage history
    events: Events = field(default_factory=Events)  # how usage records are taken (SPEC §8)

    @classmethod
    def build(
        cls,
        *,
        identity: Identity,
        meters: Mapping[str, Meter],
        features: tuple[Feature, ...],
        plans: Mapping[str, Plan],
        customers: Mapping[str, Customer],
        billing: Billing | None,
        store_failure: StoreFailure,
        sources: tuple[str, ...],
        events: Events | None = None,
        notifications: Notifications | None = None,
        history_days: int = DEFAULT_HISTORY_DAYS,
    ) -> Policy:
        """Freeze the sections and precompute the route table and the key-hash index."""
        key_index = {h: c.id for c in customers.values() for h in c.api_key_hashes}
        charges = {
            (plan.name, feature.name): resolve_charges(plan, feature, meters, billing=billing is not None)
            for plan in plans.values()
            for feature in features
            if plan.entitles(feature.name)
        }
        return cls(
            identity=identity,
            meters=MappingProxyType(dict(meters)),
            features=features,
            plans=MappingProxyType(dict(plans)),
            customers=MappingProxyType(dict(customers)),
            billing=billing,
            store_failure=store_failure,
            sources=sources,
            routes=RouteTable.compile(features),
            customer_by_key_hash=MappingProxyType(key_index),
            charges=MappingProxyType(charges),
            notifications=notifications,
            history_days=history_days,
            events=events or Events(),
        )

    @property
    def billing_interval(self) -> int:
        return self.billing.interval if self.billing else DEFAULT_BILLING_INTERVAL

    def summary(self) -> str:
        """The one line `sidecar check` prints for a valid policy."""
        return (
            f"policy OK: {len(self.sources)} file(s), {len(self.meters)} meters, "
            f"{len(self.features)} features, {len(self.plans)} plans, "
            f"{len(self.customers)} customers"
        )
