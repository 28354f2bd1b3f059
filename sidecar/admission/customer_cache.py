"""A replica's bounded cache of API key lookups: key hash → customer, or → nobody.

Why bounded: the directory holds ten million keys in Redis; a replica keeps only the keys it
has seen lately, at most SIZE of them (least recently used go first), so its memory does not
grow with the fleet. Why negative entries: a flood of requests with one bad key costs one store
lookup, not one each. Unknown keys have their own, smaller LRU (UNKNOWN_SIZE), so a flood of
distinct bad keys cannot push the good ones out, and an import can forget them all at once.

An entry is trusted for TTL_SECONDS while the changes feed is read (a change drops it sooner:
``forget_customers``, ``forget_keys``), and for DEGRADED_TTL_SECONDS while it is not, which bounds
how long a revoked key can still work when changes cannot be read. An older entry is still
there for ``stale``: during a store outage a key seen before keeps its customer.

``generation`` moves with every forget, so a lookup that began before a change and ends after
it (its answer may predate the change) is not cached: ``put`` takes the generation read when
the lookup began.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sidecar.config.policy.model import Customer

SIZE = 100_000
UNKNOWN_SIZE = 20_000
TTL_SECONDS = 10.0
DEGRADED_TTL_SECONDS = 1.0


@dataclass(slots=True)
class Entry:
    """A cached lookup: the customer (None: the key identifies nobody), the customer id whose
    change makes it wrong (None for a key nobody has), and when it was looked up."""

    customer: Customer | None
    about: str | None
    at: float


class KeyCache:
    def __init__(
        self,
        *,
        size: int = SIZE,
        unknown_size: int = UNKNOWN_SIZE,
        ttl: float = TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._known: OrderedDict[str, Entry] = OrderedDict()
        self._unknown: OrderedDict[str, Entry] = OrderedDict()
        self._by_customer: dict[str, tuple[str, ...]] = {}
        self._sizes = {True: size, False: unknown_size}
        self._ttl = ttl
        self._clock = clock
        self.generation = 0
        self.degraded = False  # the changes feed is not being read: trust entries for less

    def __len__(self) -> int:
        return len(self._known) + len(self._unknown)

    def get(self, key_hash: str) -> Entry | None:
        """The entry, if it is fresh enough to answer with."""
        entry = self._known.get(key_hash)
        table = self._known
        if entry is None:
            entry, table = self._unknown.get(key_hash), self._unknown
        if entry is None:
            return None
        ttl = DEGRADED_TTL_SECONDS if self.degraded else self._ttl
        if self._clock() - entry.at >= ttl:
            return None
        table.move_to_end(key_hash)
        return entry

    def stale(self, key_hash: str) -> Entry | None:
        """The entry however old: what a key was last known to be, for a store outage."""
        return self._known.get(key_hash) or self._unknown.get(key_hash)

    def put(self, key_hash: str, customer: Customer | None, about: str | None, generation: int) -> None:
        """Cache a lookup begun at ``generation``; dropped when something changed since."""
        if generation != self.generation:
            return
        self._remove(key_hash)
        table = self._known if customer is not None else self._unknown
        table[key_hash] = Entry(customer, about, self._clock())
        if about is not None:
            self._by_customer[about] = (*self._by_customer.get(about, ()), key_hash)
        if len(table) > self._sizes[customer is not None]:
            self._remove(next(iter(table)))

    def forget_customers(self, customer_ids: Iterable[str]) -> None:
        """Every entry a change of these customers may have made wrong."""
        self.generation += 1
        for customer_id in customer_ids:
            for key_hash in self._by_customer.pop(customer_id, ()):
                self._remove(key_hash)

    def forget_keys(self, key_hashes: Iterable[str]) -> None:
        self.generation += 1
        for key_hash in key_hashes:
            self._remove(key_hash)

    def forget_unknown(self) -> None:
        """Every key cached as nobody's (an import may have given any of them an owner)."""
        self.generation += 1
        for key_hash in list(self._unknown):
            self._remove(key_hash)

    def clear(self) -> None:
        self.generation += 1
        self._known.clear()
        self._unknown.clear()
        self._by_customer.clear()

    def _remove(self, key_hash: str) -> None:
        entry = self._known.pop(key_hash, None) or self._unknown.pop(key_hash, None)
        if entry is None or entry.about is None:
            return
        others = tuple(h for h in self._by_customer.get(entry.about, ()) if h != key_hash)
        if others:
            self._by_customer[entry.about] = others
        else:
            self._by_customer.pop(entry.about, None)
