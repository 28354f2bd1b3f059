"""Policy files → one validated Policy, or every problem found, each located to file:line:col.

The loader walks ``yaml.compose()`` nodes, never loaded Python values, so that every key and
value keeps its position and duplicate keys stay visible. Each file is checked on its own
(shape, types, vocabularies, unknown and duplicate keys). References between sections (plan →
feature, limit → meter, customer → plan) are checked once every file has been read, so a plan in
one file may name a meter defined in another.
"""

from __future__ import annotations

import difflib
import enum
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import date
from functools import partial
from types import MappingProxyType
from typing import Generic, TypeVar
from urllib.parse import SplitResult, urlsplit

from yaml.nodes import ScalarNode, SequenceNode

from sidecar.config.policy.model import (
    DEFAULT_BILLING_INTERVAL,
    Aggregation,
    Algorithm,
    Billing,
    BillingFormat,
    Customer,
    Feature,
    Identity,
    Limit,
    Meter,
    OnExceed,
    Plan,
    Policy,
    Reserve,
    Source,
    SourceKind,
    StoreFailure,
)
from sidecar.config.policy.nodes import (
    At,
    compose,
    is_tag,
    policy_files,
    read_bool,
    read_choice,
    read_fields,
    read_int,
    read_items,
    read_optional,
    read_pairs,
    read_required,
    read_str,
    read_word,
    report_expected,
    unknown_key_message,
)
from sidecar.config.policy.windows import Period
from sidecar.errors import PolicyError, PolicyInvalid

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_JSON_PATH = re.compile(r"[^.\s]+(?:\.[^.\s]+)*")
_KEY_HASH = re.compile(r"sha256:([0-9a-f]{64})")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_SOURCE_KINDS = {kind.value: kind for kind in SourceKind}
_SOURCE_ARGUMENTS = {
    SourceKind.REQUEST_HEADER: _TOKEN,
    SourceKind.RESPONSE_HEADER: _TOKEN,
    SourceKind.RESPONSE_JSON: _JSON_PATH,
    SourceKind.REQUEST_JSON: _JSON_PATH,
}
_METER_SOURCES = frozenset(SourceKind) - {SourceKind.REQUEST_JSON}
_RESERVE_SOURCES = frozenset({SourceKind.REQUEST_HEADER, SourceKind.REQUEST_JSON})
_SOURCE_HINT = (
    "expected request, request.bytes, response.bytes, response.duration_ms, "
    "request.header:NAME, response.header:NAME or response.json:a.b.c"
)
_RESERVE_HINT = "expected a whole number, request.header:NAME or request.json:a.b.c"
DEFAULT_RESERVE_TTL = 600
_NO_TOTAL = (Aggregation.MAX, Aggregation.MIN)
_MEASURED_ONLY = (Aggregation.MAX, Aggregation.MIN, Aggregation.UNIQUE)
_NOT_PREPAID = _MEASURED_ONLY

_TOP_KEYS = (
    "version",
    "identity",
    "meters",
    "features",
    "plans",
    "customers",
    "billing",
    "store_failure",
)
_ONCE = ("identity", "billing", "store_failure")
_METER_KEYS = ("aggregation", "source", "reserve", "reserve_default", "reserve_ttl")
_FEATURE_KEYS = ("name", "match", "public", "cost")
_MATCH_KEYS = ("method", "path")
_PLAN_KEYS = ("features", "limits", "prepaid", "shadow", "store_failure")
_LIMIT_KEYS = ("meter", "limit", "period", "burst", "feature", "on_exceed", "shadow")
_CUSTOMER_KEYS = ("plan", "api_keys", "billing_anchor", "stripe_customer_id", "lago_subscription_id")
_BILLING_KEYS = ("url", "format", "interval", "grace", "batch_size")


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read a policy file, or every ``*.yaml``/``*.yml`` file of a directory, into one Policy.

    A directory's files are read in sorted filename order and merged: ``meters``, ``plans`` and
    ``customers`` merge by name (a name defined twice is an error), ``features`` concatenate in
    file order, and ``identity``, ``billing`` and ``store_failure`` may appear in one file only.
    Every file must say ``version: 1``. Unknown keys and duplicate keys are errors at every level.

    Nothing is returned unless the whole policy is valid: otherwise ``PolicyInvalid`` is raised
    carrying every problem found, sorted by (file, line, col), each a ``PolicyError`` naming the
    dotted field path (``plans.pro.limits[2].period``; list indexes count from 0) and the bad
    value. An API key that is not a ``sha256:`` hash is never echoed, as it may be a secret.
    """
    draft = _Draft()
    for file in policy_files(os.fspath(path), draft.errors):
        draft.sources.append(file)
        root = compose(file, draft.errors)
        if root is not None:
            _read_file(draft, At(file, "", root, draft.errors))
    for check in draft.checks:
        check()
    draft.checks.clear()  # they hold the draft: without the cycle, refcounting frees it, not a GC pass
    if draft.errors:
        raise PolicyInvalid(sorted(draft.errors, key=lambda e: (e.file, e.line, e.col)))
    return _build(draft)


@dataclass(slots=True)
class _Def(Generic[T]):
    """A named definition: where it was first made, and its value (None if it was invalid)."""

    at: At
    value: T | None


@dataclass(slots=True)
class _Draft:
    """Everything read so far, across files; reference checks run once all files are in."""

    errors: list[PolicyError] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    sections: dict[str, At] = field(default_factory=dict)
    identity: Identity = field(default_factory=Identity)
    billing: Billing | None = None
    store_failure: StoreFailure = StoreFailure.CLOSED
    meters: dict[str, _Def[Meter]] = field(default_factory=dict)
    features: dict[str, _Def[Feature]] = field(default_factory=dict)
    plans: dict[str, _Def[Plan]] = field(default_factory=dict)
    customers: dict[str, _Def[Customer]] = field(default_factory=dict)
    key_owners: dict[str, str] = field(default_factory=dict)
    checks: list[Callable[[], object]] = field(default_factory=list)

    def later(self, check: Callable[..., object], *args: object) -> None:
        self.checks.append(partial(check, *args))


def _build(draft: _Draft) -> Policy:
    return Policy.build(
        identity=draft.identity,
        meters=_values(draft.meters),
        features=tuple(_values(draft.features).values()),
        plans=_values(draft.plans),
        customers=_values(draft.customers),
        billing=draft.billing,
        store_failure=draft.store_failure,
        sources=tuple(draft.sources),
    )


def _values(table: Mapping[str, _Def[T]]) -> dict[str, T]:
    return {name: entry.value for name, entry in table.items() if entry.value is not None}


def _valid_name(at: At, noun: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        at.error(
            f"invalid {noun} name '{name}'; use a lowercase letter, then lowercase letters, "
            "digits or _ (at most 63 characters)"
        )


def _valid_id(at: At, noun: str, name: str) -> None:
    if not _ID.fullmatch(name):
        at.error(
            f"invalid {noun} '{name}'; use a letter or digit, then letters, digits or . _ : @ - "
            "(at most 128 characters)"
        )


# -- definitions and references -----------------------------------------------------------------


def _define(table: dict[str, _Def[T]], noun: str, name: str, at: At, value: T | None) -> None:
    first = table.get(name)
    if first is not None:
        at.error(f"duplicate {noun} '{name}' (first defined at {first.at.where})")
        return
    table[name] = _Def(at, value)


def _resolve(table: Mapping[str, _Def[T]], noun: str, at: At, name: str) -> T | None:
    """The named definition's value; None when unknown (reported here) or itself invalid."""
    found = table.get(name)
    if found is None:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        at.error(f"unknown {noun} '{name}'{hint}")
        return None
    return found.value


def _names(draft: _Draft, at: At, what: str, check: Callable[..., object]) -> tuple[str, ...]:
    """A list of names, each checked by ``check(draft, at, name)`` once all files are read."""
    names = []
    for item in read_items(at):
        name = read_str(item, what)
        if name is not None:
            names.append(name)
            draft.later(check, draft, item, name)
    return tuple(names)


# -- the top level ------------------------------------------------------------------------------


def _read_file(draft: _Draft, at: At) -> None:
    pairs = read_pairs(at)
    if pairs is None:
        return
    if "version" not in (key for key, _, _ in pairs):
        at.error("missing required key 'version'")
    for key, key_at, value_at in pairs:
        read = _SECTIONS.get(key)
        if read is None:
            key_at.error(unknown_key_message(key, _TOP_KEYS))
        elif key not in _ONCE or _claim(draft, key, key_at):
            read(draft, value_at)


def _claim(draft: _Draft, section: str, key_at: At) -> bool:
    first = draft.sections.get(section)
    if first is not None:
        key_at.error(f"section '{section}' already defined at {first.where}")
        return False
    draft.sections[section] = key_at
    return True


def _version(draft: _Draft, at: At) -> None:
    version = read_int(at, minimum=1)
    if version is not None and version != 1:
        at.error(f"unsupported version {version}; expected 1")


def _identity(draft: _Draft, at: At) -> None:
    fields = read_fields(at, ("api_key_headers",))
    if fields and "api_key_headers" in fields:
        headers = _header_names(fields["api_key_headers"])
        if headers:
            draft.identity = Identity(api_key_headers=headers)


def _header_names(at: At) -> tuple[str, ...] | None:
    mark = len(at.errors)
    if isinstance(at.node, SequenceNode) and not at.node.value:
        at.error("expected at least one header name, got an empty list")
    names = tuple(name for item in read_items(at) if (name := _header_name(item)) is not None)
    return names if len(at.errors) == mark else None


def _header_name(at: At) -> str | None:
    name = read_str(at, "a header name")
    if name is not None and not _TOKEN.fullmatch(name):
        at.error(f"invalid header name '{name}'; use letters, digits and !#$%&'*+-.^_`|~")
        return None
    return name


def _store_failure(draft: _Draft, at: At) -> None:
    mode = _store_mode(at)
    if mode is not None:
        draft.store_failure = mode


def _store_mode(at: At) -> StoreFailure | None:
    return read_choice(at, StoreFailure, "store_failure")


# -- meters ----------------------------------------------------------------------------------


def _meters(draft: _Draft, at: At) -> None:
    for name, key_at, value_at in read_pairs(at) or ():
        _valid_name(key_at, "meter", name)
        _define(draft.meters, "meter", name, key_at, _meter(value_at, name))


def _meter(at: At, name: str) -> Meter | None:
    fields = read_fields(at, _METER_KEYS, required=("aggregation",))
    if fields is None:
        return None
    aggregation = read_required(fields, "aggregation", _aggregation)
    source_at = fields.get("source")
    source = _source(source_at) if source_at else Source(kind=SourceKind.REQUEST)
    if aggregation is None or source is None:
        return None
    if not _fits(aggregation, source, source_at or fields["aggregation"]):
        return None
    mark = len(at.errors)
    reserve = _reserve(fields, aggregation, source)
    if len(at.errors) > mark:
        return None
    return Meter(name=name, aggregation=aggregation, source=source, reserve=reserve)


def _aggregation(at: At) -> Aggregation | None:
    return read_choice(at, Aggregation, "aggregation")


def _fits(aggregation: Aggregation, source: Source, at: At) -> bool:
    if aggregation is Aggregation.COUNT and not source.at_request_time:
        at.error(f"aggregation 'count' counts requests; use 'sum' to add up {source}")
        return False
    if aggregation in _MEASURED_ONLY and source.at_request_time:
        at.error(
            f"aggregation '{aggregation.value}' needs a measured source such as request.bytes "
            "or request.header:NAME, not 'request'"
        )
        return False
    return True


def _source(at: At) -> Source | None:
    text = read_str(at, "a source")
    source = None if text is None else _parse_source(text, _METER_SOURCES)
    if text is not None and source is None:
        at.error(f"invalid source '{text}'; {_SOURCE_HINT}")
    return source


def _reserve(fields: dict[str, At], aggregation: Aggregation, source: Source) -> Reserve | None:
    """`reserve:` a constant, or a request source with `reserve_default` for requests that lack it."""
    reserve_at = fields.get("reserve")
    for key in ("reserve_default", "reserve_ttl"):
        if key in fields and reserve_at is None:
            fields[key].error(f"{key} applies only together with reserve")
    if reserve_at is None:
        return None
    if aggregation is not Aggregation.SUM or source.at_request_time:
        reserve_at.error("reserve applies to a 'sum' meter measured from the response, such as tokens")
        return None
    ttl = read_optional(fields, "reserve_ttl", partial(read_int, minimum=1), DEFAULT_RESERVE_TTL)
    if is_tag(reserve_at, "int"):
        amount = read_int(reserve_at, minimum=1)
        if "reserve_default" in fields:
            fields["reserve_default"].error(
                "reserve_default applies only when reserve reads a request source"
            )
        return None if amount is None else Reserve(amount=amount, ttl=ttl)
    text = read_str(reserve_at, "a reserve")
    reserve_source = None if text is None else _parse_source(text, _RESERVE_SOURCES)
    if text is not None and reserve_source is None:
        reserve_at.error(f"invalid reserve '{text}'; {_RESERVE_HINT}")
    if reserve_source is not None and "reserve_default" not in fields:
        reserve_at.error(
            f"reserve reads {text}; add reserve_default, the amount held when a request does not carry it"
        )
        return None
    default = read_optional(fields, "reserve_default", read_int, 0)
    return None if reserve_source is None else Reserve(amount=default, source=reserve_source, ttl=ttl)


def _parse_source(text: str, allowed: Collection[SourceKind]) -> Source | None:
    name, colon, argument = text.partition(":")
    kind = _SOURCE_KINDS.get(name)
    if kind not in allowed:
        return None
    rule = _SOURCE_ARGUMENTS.get(kind) if kind else None
    if kind is None or bool(colon) != (rule is not None):
        return None
    if rule is None:
        return Source(kind=kind)
    return Source(kind=kind, argument=argument) if rule.fullmatch(argument) else None


# -- features --------------------------------------------------------------------------------


def _features(draft: _Draft, at: At) -> None:
    for item in read_items(at):
        _feature(draft, item)


def _feature(draft: _Draft, at: At) -> None:
    fields = read_fields(at, _FEATURE_KEYS, required=("name", "match"))
    if fields is None:
        return
    name = read_required(fields, "name", partial(read_str, what="a feature name"))
    if name is not None:
        _valid_name(fields["name"], "feature", name)
    feature = _feature_value(draft, fields, name or "")
    if name is not None:
        _define(draft.features, "feature", name, fields["name"], feature)


def _feature_value(draft: _Draft, fields: dict[str, At], name: str) -> Feature | None:
    mark = len(draft.errors)
    route = read_required(fields, "match", _match)
    public = read_optional(fields, "public", read_bool, False)
    no_cost: Mapping[str, int] = MappingProxyType({})
    cost = read_optional(fields, "cost", partial(_cost, draft, public), no_cost)
    if route is None or not name or len(draft.errors) > mark:
        return None
    method, path = route
    return Feature(name=name, method=method, path=path, public=public, cost=cost)


def _match(at: At) -> tuple[str | None, str] | None:
    mark = len(at.errors)
    fields = read_fields(at, _MATCH_KEYS, required=("path",))
    path = read_required(fields or {}, "path", _route_path)
    method = read_optional(fields or {}, "method", _method, None)
    if path is None or len(at.errors) > mark:
        return None
    return method, path


def _method(at: At) -> str | None:
    return read_word(at, "method", _METHODS, str.upper)


def _route_path(at: At) -> str | None:
    path = read_str(at, "a path template")
    if path is None:
        return None
    if not path.startswith("/"):
        at.error(f"path '{path}' must start with '/'")
        return None
    for segment in path.split("/"):
        if ("{" in segment or "}" in segment) and not _PLACEHOLDER.fullmatch(segment):
            at.error(
                f"segment '{segment}' of path '{path}': a placeholder like {{id}} "
                "must fill a whole path segment"
            )
            return None
    return path


def _cost(draft: _Draft, public: bool, at: At) -> Mapping[str, int] | None:
    if public:
        at.error("a public feature is not metered, so it cannot have a cost")
        return None
    amounts: dict[str, int] = {}
    for meter, key_at, value_at in read_pairs(at) or ():
        draft.later(_cost_meter, draft, key_at, meter)
        amount = read_int(value_at, minimum=1)
        if amount is not None:
            amounts[meter] = amount
    return MappingProxyType(amounts)


def _cost_meter(draft: _Draft, at: At, name: str) -> None:
    meter = _resolve(draft.meters, "meter", at, name)
    if meter is not None and not meter.source.at_request_time:
        at.error(f"cost can only be given for request-time meters; '{name}' is measured from {meter.source}")


# -- plans and limits ------------------------------------------------------------------------


def _plans(draft: _Draft, at: At) -> None:
    for name, key_at, value_at in read_pairs(at) or ():
        _valid_id(key_at, "plan name", name)
        _define(draft.plans, "plan", name, key_at, _plan(draft, value_at, name))


def _plan(draft: _Draft, at: At, name: str) -> Plan | None:
    mark = len(at.errors)
    fields = read_fields(at, _PLAN_KEYS)
    if fields is None:
        return None
    features: tuple[str, ...] = read_optional(fields, "features", partial(_plan_features, draft), ())
    prepaid: tuple[str, ...] = read_optional(fields, "prepaid", partial(_prepaid, draft), ())
    read_limits = partial(_limits, draft, name, features, prepaid)
    plan = Plan(
        name=name,
        features=frozenset(features),
        limits=read_optional(fields, "limits", read_limits, ()),
        prepaid=prepaid,
        shadow=read_optional(fields, "shadow", read_bool, False),
        store_failure=read_optional(fields, "store_failure", _store_mode, None),
    )
    return plan if len(at.errors) == mark else None


def _plan_features(draft: _Draft, at: At) -> tuple[str, ...]:
    return _names(draft, at, "a feature name", _plan_feature)


def _plan_feature(draft: _Draft, at: At, name: str) -> None:
    feature = _resolve(draft.features, "feature", at, name)
    if feature is not None and feature.public:
        at.error(f"feature '{name}' is public and needs no entitlement")


def _prepaid(draft: _Draft, at: At) -> tuple[str, ...]:
    return _names(draft, at, "a meter name", _prepaid_meter)


def _prepaid_meter(draft: _Draft, at: At, name: str) -> None:
    meter = _resolve(draft.meters, "meter", at, name)
    if meter is not None and meter.aggregation in _NOT_PREPAID:
        at.error(
            f"meter '{name}' has aggregation '{meter.aggregation.value}'; "
            "prepaid credit draws down a 'count' or 'sum' meter"
        )


def _limits(
    draft: _Draft, plan: str, features: tuple[str, ...], prepaid: tuple[str, ...], at: At
) -> tuple[Limit, ...]:
    first_at: dict[tuple[str, Period, str | None], At] = {}
    limits = []
    for item in read_items(at):
        limit = _limit(draft, item, plan, features)
        if limit is None:
            continue
        if limit.meter in prepaid and limit.algorithm.calendar:
            _allowance(item, limit)
        first = first_at.setdefault((limit.meter, limit.period, limit.feature), item)
        if first is item:
            limits.append(limit)
        else:
            item.error(f"duplicate limit {limit.name}; first at line {first.line}")
    return tuple(limits)


def _limit(draft: _Draft, at: At, plan: str, features: tuple[str, ...]) -> Limit | None:
    mark = len(at.errors)
    fields = read_fields(at, _LIMIT_KEYS, required=("meter", "limit", "period"))
    if fields is None:
        return None
    meter = read_required(fields, "meter", partial(read_str, what="a meter name"))
    limit = read_required(fields, "limit", read_int)
    period = read_required(fields, "period", partial(read_choice, kind=Period, noun="period"))
    feature = read_optional(fields, "feature", partial(read_str, what="a feature name"), None)
    _limit_references(draft, fields, meter, feature, plan, features)
    burst = _burst(fields, period)
    on_exceed = read_optional(fields, "on_exceed", _on_exceed, OnExceed.REJECT)
    shadow = read_optional(fields, "shadow", read_bool, False)
    if meter is None or limit is None or period is None or len(at.errors) > mark:
        return None
    return Limit(
        meter=meter,
        limit=limit,
        period=period,
        burst=burst,
        feature=feature,
        on_exceed=on_exceed,
        shadow=shadow,
        algorithm=Algorithm.of(period),
    )


def _allowance(at: At, limit: Limit) -> None:
    """A day/week/month limit on a prepaid meter is the allowance used before credit: one plain
    number per period, so the order in which units are drawn stays the documented one."""
    rule = "on a prepaid meter a day/week/month limit is the allowance used before credit, so it"
    if limit.feature is not None:
        at.error(f"{rule} cannot be scoped to one feature")
    elif not limit.is_hard:
        at.error(f"{rule} cannot be on_exceed: allow")
    elif limit.shadow:
        at.error(f"{rule} cannot be a shadow limit")


def _on_exceed(at: At) -> OnExceed | None:
    return read_choice(at, OnExceed, "on_exceed")


def _burst(fields: dict[str, At], period: Period | None) -> int:
    burst = read_optional(fields, "burst", read_int, 0)
    if "burst" in fields and period is not None and not Algorithm.of(period).bursts:
        fields["burst"].error(f"burst applies to rate periods (second, minute, hour), not '{period.value}'")
    return burst


def _limit_references(
    draft: _Draft,
    fields: dict[str, At],
    meter: str | None,
    feature: str | None,
    plan: str,
    features: tuple[str, ...],
) -> None:
    if meter is not None:
        draft.later(_limit_meter, draft, fields["meter"], meter)
    if feature is not None:
        draft.later(_limit_feature, draft, fields["feature"], feature, plan, features)


def _limit_meter(draft: _Draft, at: At, name: str) -> None:
    meter = _resolve(draft.meters, "meter", at, name)
    if meter is not None and meter.aggregation in _NO_TOTAL:
        at.error(f"meter '{name}': a limit on a '{meter.aggregation.value}' meter has no running total")
    elif meter is not None and meter.aggregation is Aggregation.UNIQUE:
        at.error(
            f"meter '{name}': a limit on a 'unique' meter is not supported by this version: it would "
            "not be enforced, so it is refused"
        )


def _limit_feature(draft: _Draft, at: At, name: str, plan: str, features: Collection[str]) -> None:
    if name not in draft.features:
        _resolve(draft.features, "feature", at, name)
    elif name not in features:
        at.error(f"limit is scoped to feature '{name}', which plan '{plan}' does not list in its features")


# -- customers ---------------------------------------------------------------------------------


def _customers(draft: _Draft, at: At) -> None:
    for customer_id, key_at, value_at in read_pairs(at) or ():
        _valid_id(key_at, "customer id", customer_id)
        customer = _customer(draft, value_at, customer_id)
        _define(draft.customers, "customer", customer_id, key_at, customer)


def _customer(draft: _Draft, at: At, customer_id: str) -> Customer | None:
    mark = len(at.errors)
    fields = read_fields(at, _CUSTOMER_KEYS, required=("plan",))
    if fields is None:
        return None
    plan = read_required(fields, "plan", partial(read_str, what="a plan name"))
    if plan is not None:
        draft.later(_resolve, draft.plans, "plan", fields["plan"], plan)
    keys: tuple[str, ...] = read_optional(fields, "api_keys", partial(_api_keys, draft, customer_id), ())
    anchor = read_optional(fields, "billing_anchor", _date, None)
    stripe_id = read_optional(fields, "stripe_customer_id", read_str, None)
    lago_id = read_optional(fields, "lago_subscription_id", read_str, None)
    if plan is None or len(at.errors) > mark:
        return None
    return Customer(
        id=customer_id,
        plan=plan,
        api_key_hashes=keys,
        billing_anchor=anchor,
        stripe_customer_id=stripe_id,
        lago_subscription_id=lago_id,
    )


def _api_keys(draft: _Draft, customer_id: str, at: At) -> tuple[str, ...]:
    if not isinstance(at.node, SequenceNode):
        at.error("expected a list of sha256: key hashes (the value is not shown)")
        return ()
    hashes: list[str] = []
    for item in read_items(at):
        digest = _key_hash(item)
        if digest is None:
            continue
        owner = draft.key_owners.setdefault(digest, customer_id)
        if owner != customer_id:
            item.error(f"api key already belongs to customer '{owner}'")
        elif digest in hashes:
            item.error("api key listed twice for this customer")
        else:
            hashes.append(digest)
    return tuple(hashes)


def _key_hash(at: At) -> str | None:
    text = str(at.node.value) if is_tag(at, "str") else ""
    match = _KEY_HASH.fullmatch(text)
    if match:
        return match.group(1)
    if text.startswith("sha256:"):
        at.error(
            f"api key '{text}' is not sha256: followed by 64 lowercase hex digits; "
            "use `sidecar hash-key KEY` to compute it"
        )
    else:
        at.error(
            "api key is not a sha256: hash (the value is not shown); store the hash instead: "
            "use `sidecar hash-key KEY`"
        )
    return None


def _date(at: At) -> date | None:
    if not isinstance(at.node, ScalarNode):
        report_expected(at, "a date YYYY-MM-DD")
        return None
    text = str(at.node.value)
    if at.tag in ("str", "timestamp") and _DATE.fullmatch(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
    at.error(f"invalid date '{text}'; expected a date YYYY-MM-DD")
    return None


# -- billing -----------------------------------------------------------------------------------


def _billing(draft: _Draft, at: At) -> None:
    mark = len(at.errors)
    fields = read_fields(at, _BILLING_KEYS, required=("url",))
    if fields is None:
        return
    url = read_required(fields, "url", _url)
    billing_format = read_optional(fields, "format", _billing_format, BillingFormat.JSON)
    interval = read_optional(fields, "interval", partial(read_int, minimum=1), DEFAULT_BILLING_INTERVAL)
    grace = read_optional(fields, "grace", read_int, 5)
    batch_size = read_optional(fields, "batch_size", partial(read_int, minimum=1), 100)
    if url is not None and len(at.errors) == mark:
        draft.billing = Billing(
            url=url, format=billing_format, interval=interval, grace=grace, batch_size=batch_size
        )
        draft.later(_billing_ids, draft, billing_format)
    most = billing_format.max_batch
    if most is not None and batch_size > most:
        fields["batch_size"].error(
            f"billing format '{billing_format.value}' accepts at most {most} events per batch, "
            f"got {batch_size}"
        )


def _billing_ids(draft: _Draft, billing_format: BillingFormat) -> None:
    """Stripe and Lago address a customer by their own id: every customer must name it."""
    field_name = billing_format.customer_field
    if field_name is None:
        return
    for customer_id, entry in draft.customers.items():
        if entry.value is not None and getattr(entry.value, field_name) is None:
            entry.at.error(
                f"billing format '{billing_format.value}' needs {field_name} on every customer; "
                f"'{customer_id}' has none"
            )


def _billing_format(at: At) -> BillingFormat | None:
    return read_choice(at, BillingFormat, "format")


def _url(at: At) -> str | None:
    url = read_str(at, "a URL")
    if url is None:
        return None
    parts = _split_url(url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        at.error(f"invalid url '{url}'; expected an http:// or https:// URL")
        return None
    return url


def _split_url(url: str) -> SplitResult | None:
    try:
        return urlsplit(url)
    except ValueError:
        return None


_SECTIONS: dict[str, Callable[[_Draft, At], None]] = {
    "version": _version,
    "identity": _identity,
    "meters": _meters,
    "features": _features,
    "plans": _plans,
    "customers": _customers,
    "billing": _billing,
    "store_failure": _store_failure,
}
