"""The deny cache: a customer known to be over a hard limit gets its 429 without a store round
trip, until that limit resets.

Why it is sound: a refusal changes no counter, and while a hard limit is over, only time frees
it (admissions can only add to it). So a request refused at t by limits that reset at t + r is
refused again by the store until then, whatever this or any other replica does meanwhile; the
cached answer is the store's own refusal, aged (``reset`` and ``Retry-After`` count down).

What can lift a refusal sooner is not cached for more than ``VOLATILE_SECONDS`` (1 s):

* prepaid credit (a grant may arrive at any replica) and the period allowances drawn before it;
* a limit whose usage a reservation may give back when a response settles or fails, and any
  limit on a meter charged when the response ends.

Nothing is cached for more than ``MAX_SECONDS`` either, so that a store that lost writes (a
failover) is believed again within a minute.

An entry is keyed by (customer, feature) and used only while the policy and the customer object
are the very ones it was refused under: a reload swaps the policy (the cache is emptied), and a
customer stored through the admin API is a new object whenever the stored customers change, so
a plan change is seen within the directory's refresh (about a second), at once on the replica
that took the PUT. The cache holds at most ``size`` entries, least recently used evicted first.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.admission.verdict import Decision, Verdict
from sidecar.config.policy.model import Customer, Feature, Policy
from sidecar.store.port import LimitState

DEFAULT_SIZE = 100_000
VOLATILE_SECONDS = 1.0
MAX_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class _Refusal:
    customer: Customer
    verdict: Verdict
    at: float  # monotonic time of the store's answer
    until: float


class DenyCache:
    def __init__(self, *, size: int = DEFAULT_SIZE, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.hits = 0
        self._clock = clock
        self._policy: Policy | None = None
        self._entries: OrderedDict[tuple[str, str], _Refusal] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def known(self, policy: Policy, customer: Customer, feature: Feature) -> Verdict | None:
        """The refusal still in force for this customer and feature, aged to now; else None."""
        if not self._entries or policy is not self._policy:
            return None
        key = (customer.id, feature.name)
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if entry.customer is not customer or now >= entry.until:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return _aged(entry.verdict, now - entry.at)

    def note(self, policy: Policy, verdict: Verdict) -> None:
        """Remember a refusal the store just gave, for as long as it is sure to hold."""
        if verdict.decision is not Decision.REFUSED or verdict.customer is None or verdict.feature is None:
            return
        if _amount_varies(verdict):
            return  # a refusal of what one request reserved says nothing of the next one's amount
        seconds = min(hold_seconds(verdict), MAX_SECONDS)
        if seconds <= 0:
            return
        if policy is not self._policy:
            self._entries.clear()  # entries of the old policy would keep it alive
            self._policy = policy
        now = self._clock()
        key = (verdict.customer.id, verdict.feature.name)
        self._entries[key] = _Refusal(verdict.customer, verdict, now, now + seconds)
        self._entries.move_to_end(key)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, customer_id: str) -> None:
        """Drop every refusal of one customer (e.g. after a grant reached this replica)."""
        for key in [k for k in self._entries if k[0] == customer_id]:
            del self._entries[key]


def hold_seconds(verdict: Verdict) -> float:
    """How long a refusal is sure to hold: until the last refusing limit that only time frees
    resets; at most VOLATILE_SECONDS when only credit, an allowance or a reservation refused."""
    steady = [s.reset_seconds for s in verdict.refusing if not _volatile(s)]
    volatile = len(steady) < len(verdict.refusing) or bool(verdict.refusing_credits)
    return max([*steady, VOLATILE_SECONDS if volatile else 0.0])


def _amount_varies(verdict: Verdict) -> bool:
    """The request's amount comes from the request itself (a reserve such as max_tokens)."""
    spec = verdict.spec
    return spec is not None and any(m.reserve is not None and m.reserve.source for m in spec.reserves)


def _volatile(state: LimitState) -> bool:
    charge = state.charge
    return charge.allowance or charge.reserved or charge.amount == 0


def _aged(verdict: Verdict, elapsed: float) -> Verdict:
    limits = tuple(
        dataclasses.replace(s, reset_seconds=max(0.0, s.reset_seconds - elapsed)) for s in verdict.limits
    )
    return dataclasses.replace(verdict, limits=limits, store_time=verdict.store_time + elapsed)
