"""The ``notifications:`` section (url, format, thresholds) and the top-level ``history_days``:
where threshold notifications go, and how long usage history is kept."""

from __future__ import annotations

from urllib.parse import urlsplit

from sidecar.config.policy.draft import Draft
from sidecar.config.policy.nodes import (
    At,
    read_choice,
    read_fields,
    read_int,
    read_items,
    read_optional,
    read_required,
    read_str,
)
from sidecar.config.policy.notifications import (
    DEFAULT_THRESHOLDS,
    MAX_HISTORY_DAYS,
    MAX_THRESHOLD,
    Notifications,
    NotifyFormat,
)

_KEYS = ("url", "format", "thresholds")


def read_notifications(draft: Draft, at: At) -> None:
    mark = len(at.errors)
    fields = read_fields(at, _KEYS, required=("url",))
    if fields is None:
        return
    url = read_required(fields, "url", _url)
    notify_format = read_optional(fields, "format", _format, NotifyFormat.JSON)
    thresholds = read_optional(fields, "thresholds", _thresholds, DEFAULT_THRESHOLDS)
    if url is not None and len(at.errors) == mark:
        draft.notifications = Notifications(url=url, format=notify_format, thresholds=thresholds)


def read_history_days(draft: Draft, at: At) -> None:
    days = read_int(at, minimum=1)
    if days is not None and days > MAX_HISTORY_DAYS:
        at.error(f"expected at most {MAX_HISTORY_DAYS} days, got {days}")
    elif days is not None:
        draft.history_days = days


def _url(at: At) -> str | None:
    """An http(s) URL with a host, as billing.url is read."""
    url = read_str(at, "a URL")
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        at.error(f"invalid url '{url}'; expected an http:// or https:// URL")
        return None
    return url


def _format(at: At) -> NotifyFormat | None:
    return read_choice(at, NotifyFormat, "format")


def _thresholds(at: At) -> tuple[int, ...] | None:
    """Percentages, each 1 to MAX_THRESHOLD and given once; at least one."""
    mark = len(at.errors)
    items = read_items(at)
    if len(at.errors) == mark and not items:
        at.error("expected at least one threshold, got an empty list")
    seen: set[int] = set()
    for item in items:
        value = read_int(item, minimum=1)
        if value is not None and value > MAX_THRESHOLD:
            item.error(f"expected a percentage from 1 to {MAX_THRESHOLD}, got {value}")
        elif value in seen:
            item.error(f"threshold {value} given twice")
        elif value is not None:
            seen.add(value)
    return tuple(sorted(seen)) if len(at.errors) == mark else None
