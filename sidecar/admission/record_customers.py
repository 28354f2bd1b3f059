"""The customers usage records named in the last second, by id, for the next batches.

Why: the directory reads stored customers from the store (admission/customers.py, one round
trip a batch), and an app reporting usage sends batch after batch for the same customers; at
20,000 records a second that read cost as much as counting them. An entry is trusted for
TTL_SECONDS, the time SPEC §7 gives a change to reach every replica, so a record sees a changed
plan, or a deleted customer, no later than a proxied request on another replica would. A reload
of the policy (file customers, plans) starts afresh. At most SIZE entries: past it, it starts
afresh too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from sidecar.config.policy.model import Customer, Policy

TTL_SECONDS = 1.0
SIZE = 100_000


class RecentCustomers:
    def __init__(self, *, ttl: float = TTL_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._policy: Policy | None = None
        self._known: dict[str, tuple[float, Customer | None]] = {}

    def split(self, ids: Iterable[str], policy: Policy) -> tuple[dict[str, Customer], list[str]]:
        """The customers known of ``ids`` (an unknown id is left out) and the ids to look up."""
        if policy is not self._policy:
            self._policy, self._known = policy, {}
        oldest = self._clock() - self._ttl
        found: dict[str, Customer] = {}
        missing = []
        for customer_id in ids:
            entry = self._known.get(customer_id)
            if entry is None or entry[0] < oldest:
                missing.append(customer_id)
            elif entry[1] is not None:
                found[customer_id] = entry[1]
        return found, missing

    def put(self, looked_up: Iterable[str], found: Mapping[str, Customer]) -> None:
        """Remember what a lookup of ``looked_up`` found (an id not found: nobody, for a second)."""
        if len(self._known) >= SIZE:
            self._known = {}
        now = self._clock()
        for customer_id in looked_up:
            self._known[customer_id] = (now, found.get(customer_id))
