"""The ``events:`` block: how usage records (POST /admin/events, SPEC §8) are taken.

Its own module, not model.py's, so the section reader (events_section.py) and the model share
it without a cycle; model.Policy carries one.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DEDUPE_HOURS = 24
DEFAULT_MAX_AGE_DAYS = 35
# Bounds the loader holds them to. A remembered id costs Redis memory for as long as it is kept
# (README, "Usage records"), so a week is the most; records older than 35 days would reach billing
# systems past what Stripe takes (35 days), and their windows' revisions may be forgotten.
MAX_DEDUPE_HOURS = 7 * 24
MAX_AGE_DAYS = 35
# How far ahead of the store's clock a record's time may be (a producer's clock running fast).
MAX_AHEAD_SECONDS = 300


@dataclass(frozen=True, slots=True, kw_only=True)
class Events:
    """``dedupe_hours``: a record's source and id seen again within this long is a duplicate.
    ``max_age_days``: an older record is invalid."""

    dedupe_hours: int = DEFAULT_DEDUPE_HOURS
    max_age_days: int = DEFAULT_MAX_AGE_DAYS

    @property
    def dedupe_seconds(self) -> int:
        return self.dedupe_hours * 3600

    @property
    def max_age_seconds(self) -> int:
        return self.max_age_days * 86400
