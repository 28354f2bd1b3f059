"""measure(): the amount a measured meter reads from a finished exchange, or None, never a guess;
reserve_amount(): what a request holds, read from the request alone."""

from __future__ import annotations

import pytest

from sidecar.admission.sources import READERS, Exchange, measure, measure_text, reserve_amount
from sidecar.config.policy.meter_sources import SOURCE_KINDS, Phase, Source, SourceKind
from sidecar.config.policy.model import Reserve


def exchange(**overrides: object) -> Exchange:
    facts: dict[str, object] = {
        "request_headers": {"X-Units": "4"},
        "response_headers": {"X-Usage-Tokens": "321"},
        "request_bytes": 10,
        "response_bytes": 2048,
        "duration_ms": 37,
        "json_body": b'{"usage": {"total_tokens": 400, "ratio": 0.5, "neg": -1, "flag": true}}',
    }
    facts.update(overrides)
    return Exchange(**facts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "argument", "expected"),
    [
        (SourceKind.REQUEST_BYTES, None, 10),
        (SourceKind.RESPONSE_BYTES, None, 2048),
        (SourceKind.RESPONSE_DURATION_MS, None, 37),
        (SourceKind.REQUEST_HEADER, "X-Units", 4),
        (SourceKind.RESPONSE_HEADER, "X-Usage-Tokens", 321),
        (SourceKind.RESPONSE_JSON, "usage.total_tokens", 400),
    ],
)
def test_each_source_reads_its_fact(kind: SourceKind, argument: str | None, expected: int) -> None:
    assert measure(Source(kind=kind, argument=argument), exchange()) == expected


@pytest.mark.parametrize(
    ("kind", "argument", "overrides"),
    [
        (SourceKind.RESPONSE_HEADER, "X-Missing", {}),
        (SourceKind.RESPONSE_HEADER, "X-Usage-Tokens", {"response_headers": {"X-Usage-Tokens": "12abc"}}),
        (SourceKind.RESPONSE_HEADER, "X-Usage-Tokens", {"response_headers": {"X-Usage-Tokens": "-3"}}),
        (SourceKind.RESPONSE_JSON, "usage.missing", {}),
        (SourceKind.RESPONSE_JSON, "usage.ratio", {}),
        (SourceKind.RESPONSE_JSON, "usage.neg", {}),
        (SourceKind.RESPONSE_JSON, "usage.flag", {}),
        (SourceKind.RESPONSE_JSON, "usage.total_tokens.deeper", {}),
        (SourceKind.RESPONSE_JSON, "usage.total_tokens", {"json_body": b"not json"}),
        (
            SourceKind.RESPONSE_JSON,
            "usage.total_tokens",
            {"json_body": b'{"usage": {"total_tokens": Infinity}}'},
        ),
        (SourceKind.RESPONSE_JSON, "usage.total_tokens", {"json_body": None}),
    ],
)
def test_unreadable_values_are_none_not_a_guess(
    kind: SourceKind, argument: str, overrides: dict[str, object]
) -> None:
    assert measure(Source(kind=kind, argument=argument), exchange(**overrides)) is None


@pytest.mark.parametrize(
    ("kind", "argument", "expected"),
    [
        (SourceKind.REQUEST_HEADER, "X-Units", "4"),
        (SourceKind.RESPONSE_HEADER, "X-Missing", None),
        (SourceKind.RESPONSE_JSON, "usage.total_tokens", "400"),
        (SourceKind.RESPONSE_JSON, "usage.flag", None),
        (SourceKind.RESPONSE_JSON, "usage", None),
        (SourceKind.RESPONSE_BYTES, None, "2048"),
    ],
)
def test_unique_meters_read_their_value_as_text(
    kind: SourceKind, argument: str | None, expected: str | None
) -> None:
    assert measure_text(Source(kind=kind, argument=argument), exchange()) == expected


def test_every_source_read_at_the_end_or_by_a_reservation_has_a_reader() -> None:
    read = {kind for kind, traits in SOURCE_KINDS.items() if traits.phase is Phase.RESPONSE or traits.reserve}
    assert set(READERS) == read
    assert SourceKind.REQUEST not in READERS  # its amount is the feature's cost


HEADER = Source(kind=SourceKind.REQUEST_HEADER, argument="X-Max-Tokens")
FIELD = Source(kind=SourceKind.REQUEST_JSON, argument="max_tokens")


@pytest.mark.parametrize(
    ("source", "headers", "body", "expected"),
    [
        (None, {"X-Max-Tokens": "300"}, b'{"max_tokens": 300}', 50),
        (HEADER, {"X-Max-Tokens": "300"}, None, 300),
        (HEADER, {"X-Max-Tokens": "lots"}, None, 50),
        (HEADER, {}, b'{"max_tokens": 300}', 50),
        (FIELD, {"X-Max-Tokens": "7"}, b'{"max_tokens": 300}', 300),
        (FIELD, {}, b'{"max_tokens": -1}', 50),
        (FIELD, {}, None, 50),  # the body was too long to read ahead
    ],
)
def test_a_reservation_reads_the_request_or_holds_its_default(
    source: Source | None, headers: dict[str, str], body: bytes | None, expected: int
) -> None:
    assert reserve_amount(Reserve(amount=50, source=source), headers, body) == expected


def test_a_response_json_meter_reads_the_response_body_not_the_request_body() -> None:
    facts = exchange(json_body=None, request_body=b'{"usage": {"total_tokens": 9}}')
    assert measure(Source(kind=SourceKind.RESPONSE_JSON, argument="usage.total_tokens"), facts) is None
