"""The store's side of each limit algorithm: the kind tag lib.lua's parse_request, read_limit and
charge_limit dispatch on, and the keys and two window arguments of one limit in the metering
scripts' KEYS/ARGV (the rest of a limit's six values, amount, ceiling and mode, are the same for
every kind). Admission's side of the same algorithms is admission/algorithms.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from sidecar.config.policy.model import Algorithm
from sidecar.store.port import LimitCharge
from sidecar.store.redis import keys


@dataclass(frozen=True, slots=True)
class LimitKind:
    """``tag`` names the kind to lib.lua; ``layout`` gives one charge's keys and window arguments."""

    tag: str
    layout: Callable[[str, LimitCharge], tuple[tuple[str, ...], tuple[int, int]]]


def _moving_window(customer: str, charge: LimitCharge) -> tuple[tuple[str, ...], tuple[int, int]]:
    """The entry log and its running total; the window's length in µs (the store's clock places it)."""
    limit = charge.limit
    log, total = keys.rate_log(customer, limit.name), keys.rate_total(customer, limit.name)
    return (log, total), (limit.period.seconds * 1_000_000, 0)


def _calendar_quota(customer: str, charge: LimitCharge) -> tuple[tuple[str, ...], tuple[int, int]]:
    """The window's counter; the window's start and end (s), which the script checks are current."""
    window = charge.window
    if window is None:
        raise ValueError(f"limit {charge.limit.name} counts in calendar windows: its charge needs one")
    return (keys.quota(customer, charge.limit.name, window[0]),), window


LIMIT_KINDS: Mapping[Algorithm, LimitKind] = MappingProxyType(
    {
        Algorithm.MOVING_WINDOW: LimitKind("r", _moving_window),
        Algorithm.CALENDAR_QUOTA: LimitKind("c", _calendar_quota),
    }
)
