"""The customer directory: customers from the policy files, overlaid with customers stored in
Redis through the admin API, which win over a file entry with the same id, keys included.

Why it looks things up instead of loading them: the stored customers may be ten million, so a
replica keeps no copy of them. A request's key hash is looked up in a bounded cache
(customer_cache.py); on a miss, in the store (the key's owner entry and the owner's document: one
script call in the requests' own pipeline, two on a Cluster), and the answer (a customer, or
nobody) is cached. Concurrent misses of one key share one lookup.

Changes reach every replica through the store's changes feed: ``watch`` reads it (a blocking
read, one round trip per change or per second) and drops what each change may have made wrong,
so a change is served everywhere within milliseconds, and by the replica that made it at once.
While the feed cannot be read, cached entries are trusted for DEGRADED_TTL_SECONDS only; when
changes may have been missed (trimmed before this replica read them), the cache is dropped.
During a store outage a key seen before keeps its last known customer, and a key of the policy
files still finds its file customer. ``watch`` also runs the purges that are due.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sidecar.admission.customer_cache import KeyCache
from sidecar.admission.customer_input import CUSTOMER_ID, parse_customer
from sidecar.config.policy.model import Customer, Policy
from sidecar.errors import StoreUnavailable
from sidecar.store.port import CustomerChange, CustomerStore, Deleted, WriteResult, Written

__all__ = ["CUSTOMER_ID", "CustomerDirectory", "Listed", "Page", "parse_customer"]  # input checks re-exported
log = logging.getLogger("sidecar.admission.customers")

FEED_WAIT_SECONDS = 1.0  # one blocking read of the changes feed waits at most this long
RETRY_SECONDS = 0.5  # after a failed read of the feed
PURGE_INTERVAL_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Listed:
    """A customer in a page of the listing, and where it comes from ("store" or "policy")."""

    customer: Customer
    source: str


@dataclass(frozen=True, slots=True)
class Page:
    customers: tuple[Listed, ...]
    cursor: str | None  # where the next page starts; None: this was the last


class CustomerDirectory:
    def __init__(self, store: CustomerStore, *, cache: KeyCache | None = None) -> None:
        self.store = store
        self.cache = cache if cache is not None else KeyCache()
        self._policy: Policy | None = None
        self._pending: dict[str, asyncio.Future[Customer | None]] = {}
        self._position: str | None = None

    # -- who is calling ---------------------------------------------------------------------------

    async def by_key_hash(self, key_hash: str, policy: Policy) -> Customer | None:
        """The customer an API key's hash identifies, stored or in the policy files; None for
        nobody. Raises StoreUnavailable only when neither the store, the cache nor the files know."""
        if policy is not self._policy:
            self.cache.clear()  # a reload: file customers may have changed
            self._policy = policy
        entry = self.cache.get(key_hash)
        if entry is not None:
            return entry.customer
        pending = self._pending.get(key_hash)
        if pending is not None:
            await asyncio.wait([pending])  # the lookup under way for the same key
            if not pending.cancelled():
                return pending.result()
        return await self._look_up(key_hash, policy)

    async def _look_up(self, key_hash: str, policy: Policy) -> Customer | None:
        """Look the key up; callers that ask for it meanwhile wait for this answer, and do their
        own lookup if this one fails."""
        pending: asyncio.Future[Customer | None] = asyncio.get_running_loop().create_future()
        self._pending[key_hash] = pending
        try:
            customer = await self._found(key_hash, policy)
        except BaseException:
            pending.cancel()
            raise
        finally:
            del self._pending[key_hash]
        pending.set_result(customer)
        return customer

    async def _found(self, key_hash: str, policy: Policy) -> Customer | None:
        generation = self.cache.generation
        try:
            customer, about = await self._resolve(key_hash, policy)
        except StoreUnavailable:
            known = self.cache.stale(key_hash)
            if known is not None:
                return known.customer
            file_id = policy.customer_by_key_hash.get(key_hash)
            if file_id is None:
                raise
            return policy.customers[file_id]
        self.cache.put(key_hash, customer, about, generation)
        return customer

    async def _resolve(self, key_hash: str, policy: Policy) -> tuple[Customer | None, str | None]:
        """The customer and the id whose change would change the answer."""
        file_id = policy.customer_by_key_hash.get(key_hash)
        replacing: Customer | None = None
        if file_id is None:
            _, stored = await self.store.lookup(key_hash)
        else:
            _, stored, replacing = await self.store.lookup_file_key(key_hash, file_id)
        if stored is not None and key_hash in stored.api_key_hashes:
            return stored, stored.id
        if file_id is None:
            return None, None
        if replacing is not None:
            return None, file_id  # the stored entry replaced the file's, keys included
        return policy.customers[file_id], file_id

    # -- by id ------------------------------------------------------------------------------------

    async def customer(self, customer_id: str, policy: Policy) -> Customer | None:
        """A customer by id: the stored one, else the policy file's."""
        found = await self.find(customer_id, policy)
        return found.customer if found is not None else None

    async def find(self, customer_id: str, policy: Policy) -> Listed | None:
        """A customer by id and where it comes from ("store" or "policy")."""
        stored = await self.store.get(customer_id)
        if stored is not None:
            return Listed(stored, "store")
        in_file = policy.customers.get(customer_id)
        return Listed(in_file, "policy") if in_file is not None else None

    async def customers(
        self, ids: Iterable[str], policy: Policy, *, retired: bool = False
    ) -> dict[str, Customer]:
        """Customers by id (one pipelined round trip); with ``retired``, deleted stored ones too,
        whose usage is still billed."""
        wanted = list(dict.fromkeys(ids))
        found = await self.store.get_many(wanted, retired=retired)
        return {i: found.get(i) or policy.customers[i] for i in wanted if i in found or i in policy.customers}

    # -- changes ----------------------------------------------------------------------------------

    async def put(self, customers: Sequence[Customer], policy: Policy) -> list[WriteResult]:
        """Store each customer, unless one of its keys belongs to another customer (stored, or in
        the policy files and not replaced by a stored entry)."""
        refused = await self._file_conflicts(customers, policy)
        writable = [c for c, r in zip(customers, refused, strict=True) if r is None]
        written = iter(await self.store.put_many(writable) if writable else [])
        results = [r if r is not None else next(written) for r in refused]
        stored = [c for c, r in zip(customers, results, strict=True) if r.outcome is Written.STORED]
        self.apply(
            CustomerChange(tuple(c.id for c in stored), tuple(h for c in stored for h in c.api_key_hashes))
        )
        return results

    async def _file_conflicts(
        self, customers: Sequence[Customer], policy: Policy
    ) -> list[WriteResult | None]:
        claims = [
            [
                (i, owner)
                for i, h in enumerate(c.api_key_hashes)
                if (owner := policy.customer_by_key_hash.get(h)) not in (None, c.id)
            ]
            for c in customers
        ]
        owners = {owner for found in claims for _, owner in found}
        replaced = await self.store.get_many(sorted(owners)) if owners else {}
        live = [[(i, o) for i, o in found if o not in replaced] for found in claims]
        return [WriteResult(Written.CONFLICT, tuple(found)) if found else None for found in live]

    async def delete(self, customer_id: str, *, purge: bool) -> Deleted:
        deleted = await self.store.delete(customer_id, purge=purge)
        self.apply(CustomerChange((customer_id,)))
        return deleted

    async def add_key(self, customer_id: str, key_hash: str, policy: Policy) -> WriteResult:
        owner = policy.customer_by_key_hash.get(key_hash)
        if owner not in (None, customer_id) and not await self.store.get_many([str(owner)]):
            return WriteResult(Written.CONFLICT, ((0, str(owner)),))
        result = await self.store.add_key(customer_id, key_hash)
        self.apply(CustomerChange((customer_id,), (key_hash,)))
        return result

    async def revoke_key(self, customer_id: str, key_hash: str) -> WriteResult:
        result = await self.store.revoke_key(customer_id, key_hash)
        self.apply(CustomerChange((customer_id,), (key_hash,)))
        return result

    def apply(self, change: CustomerChange) -> None:
        """Drop what a change may have made wrong: from the feed, or one made here (served here at
        once, not when the feed brings it back)."""
        self.cache.forget_customers(change.customers)
        self.cache.forget_keys(change.key_hashes)
        if change.unknown_keys:
            self.cache.forget_unknown()

    # -- listing ----------------------------------------------------------------------------------

    async def page(self, policy: Policy, *, prefix: str, cursor: str, limit: int, plan: str | None) -> Page:
        """Customers in id order after ``cursor``: the stored ones, and the policy files' that no
        stored entry replaces."""
        stored = await self.store.page(prefix, cursor, limit, plan)
        end = stored.last if stored.more else None
        shown = {c.id for c in stored.customers}
        in_range = [
            i
            for i in sorted(policy.customers)
            if i > cursor and i.startswith(prefix) and (end is None or i <= end) and i not in shown
        ]
        replaced = await self.store.get_many(in_range) if in_range else {}
        files = [policy.customers[i] for i in in_range if i not in replaced]
        listed = [Listed(c, "store") for c in stored.customers]
        listed += [Listed(c, "policy") for c in files if plan is None or c.plan == plan]
        listed.sort(key=lambda item: item.customer.id)
        if len(listed) > limit:
            return Page(tuple(listed[:limit]), listed[limit - 1].customer.id)
        return Page(tuple(listed), stored.last if stored.more else None)

    # -- following the feed -----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Find where the changes feed ends, so this replica reads every change after it."""
        self._position = await self.store.feed_position()

    async def watch(self) -> None:
        """Read the changes feed and run due purges, for the life of the process."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow())
            group.create_task(self._purge_loop())

    async def _follow(self) -> None:
        failed = False
        while True:
            try:
                await self._read_feed(check_gap=failed)
                failed = False
            except Exception as error:  # the store down, or a bug: neither stops the changes for good
                if not failed:
                    bug = not isinstance(error, StoreUnavailable)
                    log.warning(
                        "cannot read customer changes (%s); cached keys trusted for 1 s", error, exc_info=bug
                    )
                failed = self.cache.degraded = True
                await asyncio.sleep(RETRY_SECONDS)

    async def _read_feed(self, *, check_gap: bool) -> None:
        if self._position is None:
            self._position = await self.store.feed_position()
            self.cache.clear()  # whatever happened before this replica found the feed
        read = await self.store.changes(self._position, FEED_WAIT_SECONDS, check_gap=check_gap)
        if read.gap:
            log.warning("customer changes may have been missed; the key cache is dropped")
            self.cache.clear()
        for change in read.changes:
            self.apply(change)
        self._position = read.position
        self.cache.degraded = False

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL_SECONDS)
            try:
                await self.purge_due()
            except StoreUnavailable:
                continue  # due again next time
            except Exception:  # a bug must not end the loop for good
                log.exception("the purge loop failed; it runs again")

    async def purge_due(self) -> None:
        """Run the due purges; each is logged by customer id and key count, no key material."""
        billing = self._policy is None or self._policy.billing is not None
        for purged in await self.store.purge_due(wait_for_billing=billing):
            log.info("purged customer '%s': %d keys erased", purged.customer, purged.keys)
