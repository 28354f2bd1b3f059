"""The ``meters:`` section: each meter's aggregation, its source and what it reserves.

A meter with ``source: event`` is fed only by usage records: count, sum, max or min, and no
reservation (nothing is measured from a response to settle one).

Which sources exist, what they take after the colon and when they are charged is the table in
meter_sources.py; the hints below are written from it.
"""

from __future__ import annotations

from functools import partial

from sidecar.config.policy.draft import Draft, define, valid_name
from sidecar.config.policy.meter_sources import (
    Source,
    SourceKind,
    is_meter_source,
    is_reserve_source,
    parse_source,
    spellings,
)
from sidecar.config.policy.model import Aggregation, Meter, Reserve
from sidecar.config.policy.nodes import (
    At,
    is_tag,
    read_choice,
    read_fields,
    read_int,
    read_optional,
    read_pairs,
    read_required,
    read_str,
)

DEFAULT_RESERVE_TTL = 600
_MEASURED_ONLY = (Aggregation.MAX, Aggregation.MIN, Aggregation.UNIQUE)
_METER_KEYS = ("aggregation", "source", "reserve", "reserve_default", "reserve_ttl")


def _one_of(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " or " + words[-1]


_SOURCE_HINT = "expected " + _one_of(spellings(is_meter_source))
_RESERVE_HINT = "expected " + _one_of(["a whole number", *spellings(is_reserve_source)])


def read_meters(draft: Draft, at: At) -> None:
    for name, key_at, value_at in read_pairs(at) or ():
        valid_name(key_at, "meter", name)
        define(draft.meters, "meter", name, key_at, _meter(value_at, name))


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
    if source.from_records:
        return _fits_records(aggregation, at)
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


def _fits_records(aggregation: Aggregation, at: At) -> bool:
    """A record reports one amount; a distinct value is not something it carries."""
    if aggregation is Aggregation.UNIQUE:
        at.error("a meter fed by usage records (source: event) takes count, sum, max or min, not 'unique'")
        return False
    return True


def _source(at: At) -> Source | None:
    text = read_str(at, "a source")
    source = None if text is None else parse_source(text, is_meter_source)
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
    if aggregation is not Aggregation.SUM or not source.measured:
        reserve_at.error("reserve applies to a 'sum' meter measured from the response, such as tokens")
        return None
    ttl = read_optional(fields, "reserve_ttl", partial(read_int, minimum=1), DEFAULT_RESERVE_TTL)
    if is_tag(reserve_at, "int"):
        return _fixed_reserve(fields, reserve_at, ttl)
    text = read_str(reserve_at, "a reserve")
    reserve_source = None if text is None else parse_source(text, is_reserve_source)
    if text is not None and reserve_source is None:
        reserve_at.error(f"invalid reserve '{text}'; {_RESERVE_HINT}")
    if reserve_source is not None and "reserve_default" not in fields:
        reserve_at.error(
            f"reserve reads {text}; add reserve_default, the amount held when a request does not carry it"
        )
        return None
    default = read_optional(fields, "reserve_default", read_int, 0)
    return None if reserve_source is None else Reserve(amount=default, source=reserve_source, ttl=ttl)


def _fixed_reserve(fields: dict[str, At], reserve_at: At, ttl: int) -> Reserve | None:
    amount = read_int(reserve_at, minimum=1)
    if "reserve_default" in fields:
        fields["reserve_default"].error("reserve_default applies only when reserve reads a request source")
    return None if amount is None else Reserve(amount=amount, ttl=ttl)
