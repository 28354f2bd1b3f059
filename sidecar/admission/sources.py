"""Pure: the amount a measured meter reads from one finished exchange, or None when it cannot.

None is never turned into a guess: the caller charges nothing and counts it in a metric.
JSON sources read a response body captured while it streamed, up to JSON_CAPTURE_LIMIT bytes;
a longer body (or a non-JSON one) cannot be read, so streamed LLM answers should report usage
in a header (`response.header:NAME`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.config.policy.model import Reserve, Source, SourceKind

JSON_CAPTURE_LIMIT = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Exchange:
    """The facts of one request and its response, gathered by the proxy as they streamed."""

    request_headers: Mapping[str, str]
    response_headers: Mapping[str, str]
    request_bytes: int
    response_bytes: int
    duration_ms: int
    json_body: bytes | None = None
    settles: bool = True  # False when the upstream failed (5xx, broke off) or the client left


def reserve_amount(reserve: Reserve, headers: Mapping[str, str], body: bytes | None) -> int:
    """What a request holds at admission: its header or JSON field, else the reserve's amount."""
    source = reserve.source
    if source is None:
        return reserve.amount
    if source.kind is SourceKind.REQUEST_HEADER:
        value = _number(headers.get(source.argument or ""))
    else:
        value = None if body is None else _number(_json_path(body, source.argument or ""))
    return reserve.amount if value is None else value


def measure(source: Source, exchange: Exchange) -> int | None:
    kind = source.kind
    if kind is SourceKind.REQUEST_BYTES:
        return exchange.request_bytes
    if kind is SourceKind.RESPONSE_BYTES:
        return exchange.response_bytes
    if kind is SourceKind.RESPONSE_DURATION_MS:
        return exchange.duration_ms
    if kind is SourceKind.REQUEST_HEADER:
        return _number(exchange.request_headers.get(source.argument or ""))
    if kind is SourceKind.RESPONSE_HEADER:
        return _number(exchange.response_headers.get(source.argument or ""))
    if kind is SourceKind.RESPONSE_JSON and exchange.json_body is not None:
        return _number(_json_path(exchange.json_body, source.argument or ""))
    return None


def measure_text(source: Source, exchange: Exchange) -> str | None:
    """The value a `unique` meter counts distinct occurrences of: a header or a JSON scalar, as text."""
    kind = source.kind
    if kind is SourceKind.REQUEST_HEADER:
        return exchange.request_headers.get(source.argument or "") or None
    if kind is SourceKind.RESPONSE_HEADER:
        return exchange.response_headers.get(source.argument or "") or None
    if kind is SourceKind.RESPONSE_JSON and exchange.json_body is not None:
        value = _json_path(exchange.json_body, source.argument or "")
        return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None
    amount = measure(source, exchange)
    return None if amount is None else str(amount)


def _number(value: object) -> int | None:
    """A non-negative whole amount from a header string or a JSON number; anything else is None."""
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.isdecimal() else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value) if value >= 0 and value == int(value) else None


def _json_path(body: bytes, path: str) -> object:
    try:
        node: object = json.loads(body)
    except ValueError:
        return None
    for step in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(step)
    return node
