"""Customers stored through the admin API, in memory: the CustomerStore port with the Redis one's
semantics (store/redis/customers.py), for unit tests. A key belongs to one customer; a write
with a key another customer holds writes nothing; a delete keeps a tombstone for billing; every
change is one entry of a feed read by position. Each call runs to its end without awaiting, so
it is atomic under asyncio; the races the Redis claims guard against cannot happen here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence

from sidecar.config.policy.model import Customer
from sidecar.store.port import CustomerChange, Deleted, FeedRead, Purged, StoredPage, WriteResult, Written


class MemoryCustomers:
    def __init__(self) -> None:
        self._customers: dict[str, Customer] = {}
        self._deleted: set[str] = set()
        self._owners: dict[str, str] = {}
        self._feed: list[CustomerChange] = []
        self._purges: set[str] = set()
        self._moved = asyncio.Event()

    async def owner(self, key_hash: str) -> str | None:
        return self._owners.get(key_hash)

    async def lookup(self, key_hash: str) -> tuple[str | None, Customer | None]:
        owner = await self.owner(key_hash)
        return owner, await self.get(owner) if owner is not None else None

    async def lookup_file_key(
        self, key_hash: str, file_id: str
    ) -> tuple[str | None, Customer | None, Customer | None]:
        owner, stored = await self.lookup(key_hash)
        return owner, stored, stored if owner == file_id else await self.get(file_id)

    async def get(self, customer_id: str, *, hot: bool = False) -> Customer | None:
        return None if customer_id in self._deleted else self._customers.get(customer_id)

    async def get_many(self, ids: Sequence[str], *, retired: bool = False) -> dict[str, Customer]:
        found = {i: self._customers[i] for i in ids if i in self._customers}
        return found if retired else {i: c for i, c in found.items() if i not in self._deleted}

    async def put_many(self, customers: Sequence[Customer]) -> list[WriteResult]:
        results = [self._put(customer) for customer in customers]
        stored = [c for c, r in zip(customers, results, strict=True) if r.outcome is Written.STORED]
        self._announce(
            CustomerChange(tuple(c.id for c in stored), tuple(h for c in stored for h in c.api_key_hashes))
        )
        return results

    def _put(self, customer: Customer) -> WriteResult:
        taken = tuple(
            (i, owner)
            for i, h in enumerate(customer.api_key_hashes)
            if (owner := self._owners.get(h, customer.id)) != customer.id
        )
        if taken:
            return WriteResult(Written.CONFLICT, taken)
        self._release(customer.id)
        self._customers[customer.id] = customer
        self._deleted.discard(customer.id)
        self._purges.discard(customer.id)
        self._owners.update(dict.fromkeys(customer.api_key_hashes, customer.id))
        return WriteResult(Written.STORED)

    def _release(self, customer_id: str) -> None:
        before = self._customers.get(customer_id)
        for key_hash in before.api_key_hashes if before is not None else ():
            self._owners.pop(key_hash, None)

    async def delete(self, customer_id: str, *, purge: bool) -> Deleted:
        if customer_id not in self._customers:
            return Deleted.NOT_FOUND
        if purge:
            self._purges.add(customer_id)
        if customer_id in self._deleted:
            return Deleted.ALREADY
        self._release(customer_id)
        self._customers[customer_id] = dataclasses.replace(self._customers[customer_id], api_key_hashes=())
        self._deleted.add(customer_id)
        self._announce(CustomerChange((customer_id,)))
        return Deleted.DELETED

    async def add_key(self, customer_id: str, key_hash: str) -> WriteResult:
        owner = self._owners.get(key_hash)
        if owner not in (None, customer_id):
            return WriteResult(Written.CONFLICT, ((0, str(owner)),))
        customer = await self.get(customer_id)
        if customer is None:
            return WriteResult(Written.NOT_FOUND)
        if key_hash in customer.api_key_hashes:
            return WriteResult(Written.REPEATED)
        keys = (*customer.api_key_hashes, key_hash)
        self._put(dataclasses.replace(customer, api_key_hashes=keys))
        self._announce(CustomerChange((customer_id,), (key_hash,)))
        return WriteResult(Written.STORED)

    async def revoke_key(self, customer_id: str, key_hash: str) -> WriteResult:
        customer = await self.get(customer_id)
        if customer is None or key_hash not in customer.api_key_hashes:
            return WriteResult(Written.NOT_FOUND)
        keys = tuple(h for h in customer.api_key_hashes if h != key_hash)
        self._put(dataclasses.replace(customer, api_key_hashes=keys))
        self._announce(CustomerChange((customer_id,)))
        return WriteResult(Written.STORED)

    async def page(self, prefix: str, after: str, limit: int, plan: str | None = None) -> StoredPage:
        ids = sorted(
            i for i in self._customers if i > after and i.startswith(prefix) and i not in self._deleted
        )
        chosen = [self._customers[i] for i in ids[:limit]]
        last = ids[min(limit, len(ids)) - 1] if ids else after
        found = tuple(c for c in chosen if plan is None or c.plan == plan)
        return StoredPage(found, last, len(ids) > limit)

    async def feed_position(self) -> str:
        return str(len(self._feed))

    async def changes(self, after: str, wait: float, *, check_gap: bool = False) -> FeedRead:
        if int(after) >= len(self._feed):
            self._moved.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), wait)
        return FeedRead(str(len(self._feed)), tuple(self._feed[int(after) :]))

    async def purge_due(self, *, wait_for_billing: bool) -> list[Purged]:
        done = [Purged(customer_id, 1) for customer_id in sorted(self._purges)]
        for purged in done:
            self._customers.pop(purged.customer, None)
            self._deleted.discard(purged.customer)
        self._purges.clear()
        return done

    def _announce(self, change: CustomerChange) -> None:
        if change.customers:
            self._feed.append(change)
            self._moved.set()
