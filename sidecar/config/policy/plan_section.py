"""The ``plans:`` section: each plan's features, its limits (meter, ceiling, period, the algorithm
that counts it), the meters it draws from prepaid credit, and its shadow and store-failure modes."""

from __future__ import annotations

from collections.abc import Collection
from functools import partial

from sidecar.config.policy.draft import Draft, define, names, resolve, valid_id
from sidecar.config.policy.model import Aggregation, Algorithm, Limit, OnExceed, Plan, StoreFailure
from sidecar.config.policy.nodes import (
    At,
    read_bool,
    read_choice,
    read_fields,
    read_int,
    read_items,
    read_optional,
    read_pairs,
    read_required,
    read_str,
)
from sidecar.config.policy.windows import Period

_NO_TOTAL = (Aggregation.MAX, Aggregation.MIN)
_NOT_PREPAID = (Aggregation.MAX, Aggregation.MIN, Aggregation.UNIQUE)
_PLAN_KEYS = ("features", "limits", "prepaid", "shadow", "store_failure")
_LIMIT_KEYS = ("meter", "limit", "period", "burst", "feature", "on_exceed", "shadow")


def read_plans(draft: Draft, at: At) -> None:
    for name, key_at, value_at in read_pairs(at) or ():
        valid_id(key_at, "plan name", name)
        define(draft.plans, "plan", name, key_at, _plan(draft, value_at, name))


def read_store_failure(at: At) -> StoreFailure | None:
    return read_choice(at, StoreFailure, "store_failure")


def _plan(draft: Draft, at: At, name: str) -> Plan | None:
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
        store_failure=read_optional(fields, "store_failure", read_store_failure, None),
    )
    return plan if len(at.errors) == mark else None


def _plan_features(draft: Draft, at: At) -> tuple[str, ...]:
    return names(draft, at, "a feature name", _plan_feature)


def _plan_feature(draft: Draft, at: At, name: str) -> None:
    feature = resolve(draft.features, "feature", at, name)
    if feature is not None and feature.public:
        at.error(f"feature '{name}' is public and needs no entitlement")


def _prepaid(draft: Draft, at: At) -> tuple[str, ...]:
    return names(draft, at, "a meter name", _prepaid_meter)


def _prepaid_meter(draft: Draft, at: At, name: str) -> None:
    meter = resolve(draft.meters, "meter", at, name)
    if meter is not None and meter.aggregation in _NOT_PREPAID:
        at.error(
            f"meter '{name}' has aggregation '{meter.aggregation.value}'; "
            "prepaid credit draws down a 'count' or 'sum' meter"
        )


# -- limits ------------------------------------------------------------------------------------


def _limits(
    draft: Draft, plan: str, features: tuple[str, ...], prepaid: tuple[str, ...], at: At
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


def _limit(draft: Draft, at: At, plan: str, features: tuple[str, ...]) -> Limit | None:
    mark = len(at.errors)
    fields = read_fields(at, _LIMIT_KEYS, required=("meter", "limit", "period"))
    if fields is None:
        return None
    meter = read_required(fields, "meter", partial(read_str, what="a meter name"))
    limit = read_required(fields, "limit", read_int)
    period = read_required(fields, "period", partial(read_choice, kind=Period, noun="period"))
    feature = read_optional(fields, "feature", partial(read_str, what="a feature name"), None)
    _limit_references(draft, fields, meter, feature, plan, features)
    algorithm = None if period is None else _algorithm(period)
    if meter is not None and period is not None and algorithm is not None and not algorithm.calendar:
        draft.later(_rate_on_records, draft, fields["period"], meter, period)
    if meter is not None and feature is not None:
        draft.later(_scoped_on_records, draft, fields["feature"], meter)
    burst = _burst(fields, period, algorithm)
    on_exceed = read_optional(fields, "on_exceed", _on_exceed, OnExceed.REJECT)
    shadow = read_optional(fields, "shadow", read_bool, False)
    if meter is None or limit is None or period is None or algorithm is None or len(at.errors) > mark:
        return None
    return Limit(
        meter=meter,
        limit=limit,
        period=period,
        burst=burst,
        feature=feature,
        on_exceed=on_exceed,
        shadow=shadow,
        algorithm=algorithm,
    )


def _algorithm(period: Period) -> Algorithm:
    """How a limit of ``period`` counts. A policy names only the period today; an algorithm that
    one period can be counted by in more than one way (a token bucket) is read here."""
    return Algorithm.of(period)


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


def _burst(fields: dict[str, At], period: Period | None, algorithm: Algorithm | None) -> int:
    burst = read_optional(fields, "burst", read_int, 0)
    if "burst" in fields and period is not None and algorithm is not None and not algorithm.bursts:
        fields["burst"].error(f"burst applies to rate periods (second, minute, hour), not '{period.value}'")
    return burst


def _limit_references(
    draft: Draft,
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


def _limit_meter(draft: Draft, at: At, name: str) -> None:
    meter = resolve(draft.meters, "meter", at, name)
    if meter is not None and meter.aggregation in _NO_TOTAL:
        at.error(f"meter '{name}': a limit on a '{meter.aggregation.value}' meter has no running total")
    elif meter is not None and meter.aggregation is Aggregation.UNIQUE:
        at.error(
            f"meter '{name}': a limit on a 'unique' meter is not supported by this version: it would "
            "not be enforced, so it is refused"
        )


def _rate_on_records(draft: Draft, at: At, name: str, period: Period) -> None:
    """Usage records charge calendar quotas and credit, never moving windows (README, "Usage
    records"), so a rate limit on a meter only they feed would never count anything."""
    found = draft.meters.get(name)
    meter = found.value if found is not None else None
    if meter is not None and meter.source.from_records:
        at.error(
            f"meter '{name}' is fed only by usage records (source: event), which rate limits do not "
            f"count; use period day, week or month, not '{period.value}'"
        )


def _scoped_on_records(draft: Draft, at: At, name: str) -> None:
    """Usage records name no feature, so a limit scoped to one never counts them."""
    found = draft.meters.get(name)
    meter = found.value if found is not None else None
    if meter is not None and meter.source.from_records:
        at.error(
            f"meter '{name}' is fed only by usage records (source: event), which name no feature; "
            "a limit on it cannot be scoped to one"
        )


def _limit_feature(draft: Draft, at: At, name: str, plan: str, features: Collection[str]) -> None:
    if name not in draft.features:
        resolve(draft.features, "feature", at, name)
    elif name not in features:
        at.error(f"limit is scoped to feature '{name}', which plan '{plan}' does not list in its features")
