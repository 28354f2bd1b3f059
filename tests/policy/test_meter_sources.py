"""The table of meter sources: what a policy may write, and what the loader's hints list."""

from __future__ import annotations

import pytest

from sidecar.config.policy.meter_sources import (
    SOURCE_KINDS,
    Phase,
    Source,
    SourceKind,
    is_meter_source,
    is_reserve_source,
    parse_source,
    spellings,
)


def test_every_kind_has_one_row() -> None:
    assert list(SOURCE_KINDS) == list(SourceKind)


def test_the_hints_list_each_allowed_spelling_in_table_order() -> None:
    assert spellings(is_meter_source) == [
        "request",
        "request.bytes",
        "response.bytes",
        "response.duration_ms",
        "request.header:NAME",
        "response.header:NAME",
        "response.json:a.b.c",
        "event",
    ]
    assert spellings(is_reserve_source) == ["request.header:NAME", "request.json:a.b.c"]


def test_only_the_request_itself_is_charged_at_admission() -> None:
    at_admission = [kind for kind, traits in SOURCE_KINDS.items() if traits.phase is Phase.REQUEST]
    assert at_admission == [SourceKind.REQUEST]
    assert Source(kind=SourceKind.REQUEST).at_request_time
    assert not Source(kind=SourceKind.REQUEST_HEADER, argument="X-Units").at_request_time


def test_an_event_meter_is_fed_by_records_alone() -> None:
    event = Source(kind=SourceKind.EVENT)
    assert parse_source("event", is_meter_source) == event
    assert parse_source("event:x", is_meter_source) is None
    assert event.from_records and not event.measured and not event.at_request_time
    assert not is_reserve_source(event.traits)
    assert Source(kind=SourceKind.RESPONSE_BYTES).measured


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("request", Source(kind=SourceKind.REQUEST)),
        (
            "response.header:X-Usage-Tokens",
            Source(kind=SourceKind.RESPONSE_HEADER, argument="X-Usage-Tokens"),
        ),
        (
            "response.json:usage.total_tokens",
            Source(kind=SourceKind.RESPONSE_JSON, argument="usage.total_tokens"),
        ),
        ("request:x", None),  # takes no argument
        ("response.header", None),  # needs one
        ("response.header:", None),
        ("response.header:X Tokens", None),
        ("response.json:usage..total", None),
        ("request.json:max_tokens", None),  # a reservation's source, not a meter's
        ("response.heder:X", None),
    ],
)
def test_a_meter_source_parses_or_is_none(text: str, expected: Source | None) -> None:
    assert parse_source(text, is_meter_source) == expected


def test_a_reservation_reads_only_the_request() -> None:
    assert parse_source("request.json:max_tokens", is_reserve_source) == Source(
        kind=SourceKind.REQUEST_JSON, argument="max_tokens"
    )
    assert parse_source("response.json:usage", is_reserve_source) is None
