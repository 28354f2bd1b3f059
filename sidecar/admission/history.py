"""The history document of SPEC §7: a customer's usage per window, from the summaries billing was
sent (store/history.py), optionally one meter or feature, optionally summed into coarser steps.

``GET /admin/customers/{id}/history`` and the customer's own ``GET /_sidecar/history`` read it:
``from`` and ``to`` (RFC 3339 with a zone, or unix seconds) bound the windows' starts, by default
the last ``history_days``; the read never reaches further back than that, so its cost is bounded
by the history kept (one hash a day, read in one round trip).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sidecar.config.policy.model import Aggregation, Policy
from sidecar.config.policy.windows import rfc3339
from sidecar.store.history import DAY, HistoryStore, HistoryWindow

MAX_STEP = 31 * DAY
_EXTREMES = {Aggregation.MAX: max, Aggregation.MIN: min}


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """Windows starting in [start, end), of ``meter`` and ``feature`` when given, in ``step``s."""

    start: int
    end: int
    meter: str | None = None
    feature: str | None = None
    step: int | None = None


def parse_query(params: Mapping[str, str], now: float, history_days: int) -> HistoryQuery | list[str]:
    """The query a request's parameters ask for, or every problem with them."""
    problems: list[str] = []
    earliest = int(now) - (history_days + 1) * DAY
    start = _time(params, "from", int(now) - history_days * DAY, problems)
    end = _time(params, "to", int(now) + 1, problems)
    step = _step(params.get("step"), problems)
    if problems:
        return problems
    meter, feature = params.get("meter") or None, params.get("feature") or None
    return HistoryQuery(max(start, earliest), end, meter, feature, step)


def _time(params: Mapping[str, str], name: str, default: int, problems: list[str]) -> int:
    value = params.get(name)
    if not value:
        return default
    if value.isascii() and value.isdigit():
        return int(value)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        problems.append(f"{name} must be an RFC 3339 time with a zone (2026-12-01T00:00:00Z) or unix seconds")
        return default
    return int(parsed.timestamp())


def _step(value: str | None, problems: list[str]) -> int | None:
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_STEP:
        problems.append(f"step must be a whole number of seconds from 1 to {MAX_STEP} (86400: a day)")
        return None
    return int(value)


async def history_document(
    policy: Policy, store: HistoryStore, customer_id: str, query: HistoryQuery
) -> dict[str, Any]:
    """The customer's windows in the query's range; raises StoreUnavailable."""
    found = await store.windows(customer_id, query.start, query.end)
    chosen = [
        w
        for w in found
        if (query.meter is None or w.meter == query.meter)
        and (query.feature is None or w.feature == query.feature)
    ]
    windows = chosen if query.step is None else stepped(chosen, query.step, policy)
    return {
        "customer": customer_id,
        "from": rfc3339(query.start),
        "to": rfc3339(query.end),
        "history_days": policy.history_days,
        "step": query.step,
        "windows": [_row(window) for window in windows],
    }


def stepped(windows: Iterable[HistoryWindow], step: int, policy: Policy) -> list[HistoryWindow]:
    """Windows combined into steps of ``step`` seconds from the epoch, per meter and feature: a
    max or min meter keeps the extreme, the others add up."""
    combined: dict[tuple[int, str, str], HistoryWindow] = {}
    for window in windows:
        start = window.window_start - window.window_start % step
        key = (start, window.meter, window.feature)
        before = combined.get(key)
        value = window.value if before is None else _combine(policy, window.meter, before.value, window.value)
        combined[key] = HistoryWindow(start, start + step, window.meter, window.feature, value)
    return sorted(combined.values())


def _combine(policy: Policy, meter_name: str, a: int, b: int) -> int:
    meter = policy.meters.get(meter_name)
    extreme = _EXTREMES.get(meter.aggregation) if meter is not None else None
    return extreme(a, b) if extreme is not None else a + b


def _row(window: HistoryWindow) -> dict[str, Any]:
    return {
        "window_start": rfc3339(window.window_start),
        "window_end": rfc3339(window.window_end),
        "meter": window.meter,
        "feature": window.feature,
        "value": window.value,
    }
