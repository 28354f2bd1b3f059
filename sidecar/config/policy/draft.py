"""A policy being loaded: what every file has said so far, and the checks left for the end.

Each section reader (meter_section.py, feature_section.py, plan_section.py, customer_section.py,
billing_section.py) adds its definitions here as it reads a file. References between sections
are checked with ``Draft.later`` once every file is in, so a plan in one file may name a meter
defined in another.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, TypeVar

from sidecar.config.policy.events import Events
from sidecar.config.policy.model import Billing, Customer, Feature, Identity, Meter, Plan, StoreFailure
from sidecar.config.policy.nodes import At, read_items, read_str
from sidecar.config.policy.notifications import DEFAULT_HISTORY_DAYS, Notifications
from sidecar.errors import PolicyError

T = TypeVar("T")

_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


@dataclass(slots=True)
class Def(Generic[T]):
    """A named definition: where it was first made, and its value (None if it was invalid)."""

    at: At
    value: T | None


@dataclass(slots=True)
class Draft:
    """Everything read so far, across files; reference checks run once all files are in."""

    errors: list[PolicyError] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    sections: dict[str, At] = field(default_factory=dict)
    identity: Identity = field(default_factory=Identity)
    billing: Billing | None = None
    store_failure: StoreFailure = StoreFailure.CLOSED
    notifications: Notifications | None = None
    history_days: int = DEFAULT_HISTORY_DAYS
    events: Events = field(default_factory=Events)
    meters: dict[str, Def[Meter]] = field(default_factory=dict)
    features: dict[str, Def[Feature]] = field(default_factory=dict)
    plans: dict[str, Def[Plan]] = field(default_factory=dict)
    customers: dict[str, Def[Customer]] = field(default_factory=dict)
    key_owners: dict[str, str] = field(default_factory=dict)
    checks: list[Callable[[], object]] = field(default_factory=list)

    def later(self, check: Callable[..., object], *args: object) -> None:
        self.checks.append(partial(check, *args))


def values(table: Mapping[str, Def[T]]) -> dict[str, T]:
    return {name: entry.value for name, entry in table.items() if entry.value is not None}


def valid_name(at: At, noun: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        at.error(
            f"invalid {noun} name '{name}'; use a lowercase letter, then lowercase letters, "
            "digits or _ (at most 63 characters)"
        )


def valid_id(at: At, noun: str, name: str) -> None:
    if not _ID.fullmatch(name):
        at.error(
            f"invalid {noun} '{name}'; use a letter or digit, then letters, digits or . _ : @ - "
            "(at most 128 characters)"
        )


def define(table: dict[str, Def[T]], noun: str, name: str, at: At, value: T | None) -> None:
    first = table.get(name)
    if first is not None:
        at.error(f"duplicate {noun} '{name}' (first defined at {first.at.where})")
        return
    table[name] = Def(at, value)


def resolve(table: Mapping[str, Def[T]], noun: str, at: At, name: str) -> T | None:
    """The named definition's value; None when unknown (reported here) or itself invalid."""
    found = table.get(name)
    if found is None:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        at.error(f"unknown {noun} '{name}'{hint}")
        return None
    return found.value


def names(draft: Draft, at: At, what: str, check: Callable[..., object]) -> tuple[str, ...]:
    """A list of names, each checked by ``check(draft, at, name)`` once all files are read."""
    found = []
    for item in read_items(at):
        name = read_str(item, what)
        if name is not None:
            found.append(name)
            draft.later(check, draft, item, name)
    return tuple(found)
