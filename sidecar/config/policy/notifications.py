"""Threshold notifications and usage history as the policy says them (SPEC §7, §9): frozen values,
built by the loader (notifications_section.py) and read by admission (which thresholds a metering
call watches) and billing (where the notifier sends what the store decided)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

DEFAULT_THRESHOLDS: tuple[int, ...] = (80, 100)
# The most a threshold may be, in percent: above 100 only soft limits and overdrafts reach it.
MAX_THRESHOLD = 1000
DEFAULT_HISTORY_DAYS = 35
MAX_HISTORY_DAYS = 400


class NotifyFormat(enum.Enum):
    """How one notification is sent: a plain JSON object, or a CloudEvents 1.0 structured event."""

    JSON = "json"
    CLOUDEVENTS = "cloudevents"


@dataclass(frozen=True, slots=True, kw_only=True)
class Notifications:
    """Where notifications go and when: ``thresholds`` in percent of every limit's ceiling and
    of the prepaid credit in force, ascending, each at most once."""

    url: str
    format: NotifyFormat = NotifyFormat.JSON
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS
