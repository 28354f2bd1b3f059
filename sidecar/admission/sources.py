"""Pure: the amount a measured meter reads from one finished exchange, or None when it cannot.

READERS is admission's half of the meter-source table: one reader per SourceKind, giving the raw
fact a source names (a byte count, a header's text, a JSON value). What the policy knows of each
kind (its argument, when it is charged, whether it reserves) is config's half,
config/policy/meter_sources.py.

None is never turned into a guess: the caller charges nothing and counts it in a metric.
JSON sources read a response body captured while it streamed, up to JSON_CAPTURE_LIMIT bytes;
a longer body (or a non-JSON one) cannot be read, so streamed LLM answers should report usage
in a header (`response.header:NAME`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from sidecar.config.policy.meter_sources import Source, SourceKind
from sidecar.config.policy.model import Reserve

JSON_CAPTURE_LIMIT = 1024 * 1024
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Exchange:
    """The facts of one request and its response, gathered by the proxy as they streamed."""

    request_headers: Mapping[str, str]
    response_headers: Mapping[str, str]
    request_bytes: int
    response_bytes: int
    duration_ms: int
    json_body: bytes | None = None  # the response's, captured when a meter reads it
    settles: bool = True  # False when the upstream failed (5xx, broke off) or the client left
    request_body: bytes | None = None  # read ahead when a reservation reads it

    @classmethod
    def before_forwarding(cls, headers: Mapping[str, str], body: bytes | None) -> Exchange:
        """What a reservation can read: the request alone, nothing of a response yet."""
        return cls(
            request_headers=headers,
            response_headers=_NO_HEADERS,
            request_bytes=0,
            response_bytes=0,
            duration_ms=0,
            request_body=body,
        )


# The raw fact a source names, given the exchange and the source's argument (header, JSON path).
Reader = Callable[[Exchange, str], object]

READERS: Mapping[SourceKind, Reader] = MappingProxyType(
    {
        SourceKind.REQUEST_BYTES: lambda exchange, _: exchange.request_bytes,
        SourceKind.RESPONSE_BYTES: lambda exchange, _: exchange.response_bytes,
        SourceKind.RESPONSE_DURATION_MS: lambda exchange, _: exchange.duration_ms,
        SourceKind.REQUEST_HEADER: lambda exchange, name: exchange.request_headers.get(name) or None,
        SourceKind.RESPONSE_HEADER: lambda exchange, name: exchange.response_headers.get(name) or None,
        SourceKind.RESPONSE_JSON: lambda exchange, path: _json_path(exchange.json_body, path),
        SourceKind.REQUEST_JSON: lambda exchange, path: _json_path(exchange.request_body, path),
    }
)  # SourceKind.REQUEST reads nothing: its amount is the feature's cost, known at admission


def reserve_amount(reserve: Reserve, headers: Mapping[str, str], body: bytes | None) -> int:
    """What a request holds at admission: its header or JSON field, else the reserve's amount."""
    if reserve.source is None:
        return reserve.amount
    value = measure(reserve.source, Exchange.before_forwarding(headers, body))
    return reserve.amount if value is None else value


def measure(source: Source, exchange: Exchange) -> int | None:
    return _number(_read(source, exchange))


def measure_text(source: Source, exchange: Exchange) -> str | None:
    """The value a `unique` meter counts distinct occurrences of: a header or a JSON scalar, as text."""
    value = _read(source, exchange)
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _read(source: Source, exchange: Exchange) -> object:
    reader = READERS.get(source.kind)
    return None if reader is None else reader(exchange, source.argument or "")


def _number(value: object) -> int | None:
    """A non-negative whole amount from a header string or a JSON number; anything else is None."""
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.isdecimal() else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value) if value >= 0 and value == int(value) else None


def _json_path(body: bytes | None, path: str) -> object:
    if body is None:
        return None
    try:
        node: object = json.loads(body)
    except ValueError:
        return None
    for step in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(step)
    return node
