"""The ``events:`` section: how long a usage record's id is remembered, and how old a record may be."""

from __future__ import annotations

from collections.abc import Callable

from sidecar.config.policy.draft import Draft
from sidecar.config.policy.events import (
    DEFAULT_DEDUPE_HOURS,
    DEFAULT_MAX_AGE_DAYS,
    MAX_AGE_DAYS,
    MAX_DEDUPE_HOURS,
    Events,
)
from sidecar.config.policy.nodes import At, read_fields, read_int, read_optional

_EVENTS_KEYS = ("dedupe_hours", "max_age_days")


def read_events(draft: Draft, at: At) -> None:
    fields = read_fields(at, _EVENTS_KEYS)
    if fields is None:
        return
    dedupe = read_optional(fields, "dedupe_hours", _bounded(MAX_DEDUPE_HOURS), DEFAULT_DEDUPE_HOURS)
    max_age = read_optional(fields, "max_age_days", _bounded(MAX_AGE_DAYS), DEFAULT_MAX_AGE_DAYS)
    draft.events = Events(dedupe_hours=dedupe, max_age_days=max_age)


def _bounded(most: int) -> Callable[[At], int | None]:
    def read(at: At) -> int | None:
        value = read_int(at, minimum=1)
        if value is not None and value > most:
            at.error(f"expected an integer from 1 to {most}, got {value}")
            return None
        return value

    return read
