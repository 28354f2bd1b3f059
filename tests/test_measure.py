"""measure(): the amount a measured meter reads from a finished exchange, or None, never a guess."""

from __future__ import annotations

import pytest

from sidecar.admission.sources import Exchange, measure, measure_text
from sidecar.config.policy.model import Source, SourceKind


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
