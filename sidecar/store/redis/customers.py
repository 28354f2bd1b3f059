"""The CustomerStore of store/port.py over Redis: documents, key owners, claims and their undoing.

Where things are (keys.py): one hash per customer on the customer's own slot, one owner entry per
API key hash (each its own key, so a Cluster spreads the index as it spreads the counters), a
listing index in INDEX_BUCKETS sorted sets (customer_listing.py), and a changes stream every
replica reads (customer_feed.py). The purge is customer_purge.py.

A key belongs to one customer fleet-wide. A write claims each of its keys first, with a
compare-and-set on the key's owner entry (customer_claim.lua), then writes the document
(customer_put.lua), then gives back the keys the document before had and this one has not. Two
writers racing for one key: the first claim wins, the second finds the key held and writes
nothing (its own claims undone). Each write stamps its claims with a token of its own and the
document records it, so a give-back (customer_unclaim.lua) never takes a key that a later write
of the same customer re-stamped. A writer that dies between claim and document leaves a claim
its owner's document does not list: lookups ignore it, and a claim older than STALE_CLAIM_MS
may be taken over (a write slower than WRITE_MS writes nothing, so it cannot race that).

A request's lookup (``lookup``: the key's owner entry and the owner's document) rides the hot
path's script batcher, in the requests' own pipeline, under the store timeout: one EVALSHA on one
server (customer_lookup.lua), two on a Cluster, where the two keys are on different slots.
Everything else rides a batcher of its own with a longer deadline (BULK_TIMEOUT), so that an
import's pipelines never share a deadline or a connection with requests.
"""

from __future__ import annotations

import asyncio
import secrets
import zlib
from collections.abc import Sequence
from typing import Any

from sidecar.config.policy.model import Customer
from sidecar.errors import StoreUnavailable
from sidecar.store.port import CustomerChange, Deleted, FeedRead, Purged, StoredPage, WriteResult, Written
from sidecar.store.redis import keys
from sidecar.store.redis.breaker import CircuitBreaker
from sidecar.store.redis.calls import BACKGROUND_TIMEOUT, load_script
from sidecar.store.redis.customer_claims import (
    WRITE_MS,
    Claimed,
    Claims,
    Item,
    Write,
    gathered,
    give_back,
    per_item,
    text,
)
from sidecar.store.redis.customer_docs import Claim, Document, document, scalars
from sidecar.store.redis.customer_feed import Feed
from sidecar.store.redis.customer_listing import Listing
from sidecar.store.redis.customer_purge import Purges
from sidecar.store.redis.pipeline import Script, ScriptBatcher
from sidecar.store.redis.topology import Arg, StoreClient

BULK_TIMEOUT = 5.0  # seconds one pipeline of admin or import calls may take
TOMBSTONE_SECONDS = 40 * 86400  # a deleted customer's document, for billing what it used
SMALL_CHANGE = 32  # a write of more customers tells replicas "every unknown key" instead of its keys


class RedisCustomers:
    def __init__(
        self,
        client: StoreClient,
        batcher: ScriptBatcher,
        *,
        breaker: CircuitBreaker | None = None,
        timeout: float = BACKGROUND_TIMEOUT,
    ):
        self.client = client
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.bulk = ScriptBatcher(batcher.locator, timeout=BULK_TIMEOUT)
        read = load_script("customer_read", shared=False)
        self._read_hot = batcher.register(read)
        self._lookup = batcher.register(load_script("customer_lookup", shared=False))
        self._read = self.bulk.register(read)
        self._sharded = batcher.locator.sharded
        unclaim = self._script("customer_unclaim")
        self.claims = Claims(self._script("customer_claim"), unclaim, self._documents, sharded=self._sharded)
        self._put = self._script("customer_put")
        self._delete = self._script("customer_delete")
        self._add_key = self._script("customer_add_key")
        self._revoke_key = self._script("customer_revoke_key")
        self._index = self._script("customer_index")
        self.feed = Feed(client, self._script("customer_changed"), timeout=timeout)
        self.listing = Listing(self._script("customer_range"), self.get_many)
        self.purges = Purges(client, self._script("claim"), self._script("customer_erase"), timeout=timeout)

    def _script(self, name: str) -> Script:
        return self.bulk.register(load_script(name, shared=False))

    async def close(self) -> None:
        await self.bulk.close()

    # -- reads ------------------------------------------------------------------------------------

    async def owner(self, key_hash: str) -> str | None:
        entry = await self._hot(keys.key_owner(key_hash))
        return Claim.parse(text(entry)).owner if isinstance(entry, bytes) else None

    async def lookup(self, key_hash: str) -> tuple[str | None, Customer | None]:
        if self._sharded:
            owner = await self.owner(key_hash)
            return owner, await self.get(owner, hot=True) if owner is not None else None
        found = await self._hot(keys.key_owner(key_hash), self._lookup, list(keys.CUSTOMER_AROUND))
        if not isinstance(found, list):
            return None, None
        return _claimed(found[0], found[1])

    async def lookup_file_key(
        self, key_hash: str, file_id: str
    ) -> tuple[str | None, Customer | None, Customer | None]:
        if self._sharded:
            return await self._lookup_file_key_apart(key_hash, file_id)
        args = [*keys.CUSTOMER_AROUND, file_id]
        found = await self._hot(keys.key_owner(key_hash), self._lookup, args)
        owner, owned = _claimed(found[0], found[1])
        return owner, owned, _live(document(file_id, _flat(found[2])))

    async def _lookup_file_key_apart(
        self, key_hash: str, file_id: str
    ) -> tuple[str | None, Customer | None, Customer | None]:
        """On a Cluster the owner entry and the documents live on different slots: the owner
        first, then both documents side by side (two round trips in a row, not three)."""
        owner = await self.owner(key_hash)
        if owner is None or owner == file_id:
            stored = await self.get(file_id, hot=True)
            return owner, stored if owner is not None else None, stored
        owned, filed = await asyncio.gather(self.get(owner, hot=True), self.get(file_id, hot=True))
        return owner, owned, filed

    async def get(self, customer_id: str, *, hot: bool = False) -> Customer | None:
        key = keys.customer(customer_id)
        reply = await (self._hot(key) if hot else self._read([key]))
        found = document(customer_id, _flat(reply))
        return _live(found)

    async def _hot(self, key: str, script: Script | None = None, args: Sequence[Arg] = ()) -> Any:
        """A request's lookup: through the store's circuit breaker, like its metering calls, so
        that a paused store costs the requests one timeout each only until the breaker opens."""
        if not self.breaker.allow():
            raise StoreUnavailable("the store failed repeatedly; the circuit breaker is open")
        try:
            reply = await (script or self._read_hot)([key], args)
        except StoreUnavailable:
            self.breaker.failed()
            raise
        self.breaker.succeeded()
        return reply

    async def get_many(self, ids: Sequence[str], *, retired: bool = False) -> dict[str, Customer]:
        found = await self._documents(ids)
        return {i: d.customer for i, d in found.items() if retired or not d.deleted}

    async def _documents(self, ids: Sequence[str]) -> dict[str, Document]:
        unique = list(dict.fromkeys(ids))
        replies = await gathered([self._read([keys.customer(i)]) for i in unique])
        found = {i: document(i, _flat(reply)) for i, reply in zip(unique, replies, strict=True)}
        return {i: d for i, d in found.items() if d is not None}

    # -- writes -----------------------------------------------------------------------------------

    async def put_many(self, customers: Sequence[Customer]) -> list[WriteResult]:
        """Each customer in three phases for them all, each in as few calls as the topology
        allows: claims, documents, give-backs."""
        batch = secrets.token_hex(4)
        writes = [Write(c.id, c.api_key_hashes, f"{batch}{i:x}") for i, c in enumerate(customers)]
        await self._index_ids("add", [c.id for c in customers])
        claimed = await self.claims.claim(writes)
        results = [WriteResult(Written.CONFLICT, c.refused) if c.refused else None for c in claimed]
        writable = [i for i, result in enumerate(results) if result is None]
        items = [_document_item(customers[i], claimed[i]) for i in writable]
        replies = await per_item(self._put, items, sharded=self._sharded, head=(WRITE_MS,))
        afterwards = [item for c in claimed if c.refused for item in self.claims.undo(c)]
        for i, reply in zip(writable, replies, strict=True):
            if int(reply[0]):
                results[i] = WriteResult(Written.STORED)
                afterwards += _dropped(customers[i], reply[1])
            else:
                results[i] = WriteResult(Written.SLOW)
                afterwards += self.claims.undo(claimed[i])
        await self.claims.release(afterwards)
        done = [r if r is not None else WriteResult(Written.SLOW) for r in results]
        await self.feed.announce(_change(customers, done))
        return done

    async def _index_ids(self, operation: str, ids: Sequence[str]) -> None:
        buckets: dict[int, list[str]] = {}
        for customer_id in ids:
            buckets.setdefault(bucket_of(customer_id), []).append(customer_id)
        await gathered([self._index([keys.customer_index(b)], [operation, *m]) for b, m in buckets.items()])

    async def delete(self, customer_id: str, *, purge: bool) -> Deleted:
        doc_keys = [keys.customer(customer_id), keys.customer_purge(customer_id)]
        reply = await self._delete(doc_keys, [TOMBSTONE_SECONDS, "1" if purge else "0"])
        status = int(reply[0])
        if status == 0:
            return Deleted.NOT_FOUND
        if status == 1:
            before = document(customer_id, _flat(reply[1]))
            tokens = before.tokens if before is not None else {}
            await self.claims.release([give_back(customer_id, h, t) for h, t in tokens.items()])
            await self._index_ids("rem", [customer_id])
            await self.feed.announce(CustomerChange(customers=(customer_id,)))
        if purge:
            await self.purges.schedule(customer_id)
        return Deleted.DELETED if status == 1 else Deleted.ALREADY

    async def add_key(self, customer_id: str, key_hash: str) -> WriteResult:
        (claimed,) = await self.claims.claim([Write(customer_id, (key_hash,), secrets.token_hex(5))])
        if claimed.refused:
            return WriteResult(Written.CONFLICT, claimed.refused)
        arguments: list[Arg] = [key_hash, claimed.write.token, claimed.first_ms, WRITE_MS]
        added = int(await self._add_key([keys.customer(customer_id)], arguments))
        if added <= 0:
            await self.claims.release(self.claims.undo(claimed))
            return WriteResult(Written.NOT_FOUND if added == 0 else Written.SLOW)
        await self.feed.announce(CustomerChange(customers=(customer_id,), key_hashes=(key_hash,)))
        return WriteResult(Written.STORED if added == 1 else Written.REPEATED)

    async def revoke_key(self, customer_id: str, key_hash: str) -> WriteResult:
        token = await self._revoke_key([keys.customer(customer_id)], [key_hash])
        if not isinstance(token, bytes):
            return WriteResult(Written.NOT_FOUND)
        await self.claims.release([give_back(customer_id, key_hash, token.decode())])
        await self.feed.announce(CustomerChange(customers=(customer_id,)))
        return WriteResult(Written.STORED)

    # -- listing, feed, purge ---------------------------------------------------------------------

    async def page(self, prefix: str, after: str, limit: int, plan: str | None = None) -> StoredPage:
        return await self.listing.page(prefix, after, limit, plan)

    async def feed_position(self) -> str:
        return await self.feed.position()

    async def changes(self, after: str, wait: float, *, check_gap: bool = False) -> FeedRead:
        return await self.feed.read(after, wait, check_gap=check_gap)

    async def purge_due(self, *, wait_for_billing: bool) -> list[Purged]:
        return await self.purges.run_due(wait_for_billing=wait_for_billing)


def _document_item(customer: Customer, claimed: Claimed) -> Item:
    """customer_put.lua's item: the document and purge marker; first claim, fields."""
    flat = scalars(customer)
    doc_keys = (keys.customer(customer.id), keys.customer_purge(customer.id))
    hashes = " ".join(customer.api_key_hashes)
    return Item(doc_keys, (claimed.first_ms, claimed.write.token, hashes, len(flat) // 2, *flat))


def _dropped(customer: Customer, flat_before: Any) -> list[Item]:
    """Give-backs of the keys the document before had and this one has not."""
    before = document(customer.id, _flat(flat_before))
    kept = set(customer.api_key_hashes)
    gone = {h: t for h, t in before.tokens.items() if h not in kept} if before is not None else {}
    return [give_back(customer.id, h, t) for h, t in gone.items()]


def bucket_of(customer_id: str) -> int:
    """The listing bucket of an id: spread evenly, the same on every replica."""
    return zlib.crc32(customer_id.encode()) % keys.INDEX_BUCKETS


def _change(customers: Sequence[Customer], results: Sequence[WriteResult]) -> CustomerChange:
    stored = [c for c, r in zip(customers, results, strict=True) if r.outcome is Written.STORED]
    ids = tuple(dict.fromkeys(c.id for c in stored))
    if len(stored) > SMALL_CHANGE:
        return CustomerChange(customers=ids, unknown_keys=True)
    return CustomerChange(customers=ids, key_hashes=tuple(h for c in stored for h in c.api_key_hashes))


def _flat(reply: Any) -> list[Any]:
    return reply if isinstance(reply, list) else []


def _live(found: Document | None) -> Customer | None:
    return found.customer if found is not None and not found.deleted else None


def _claimed(entry: Any, owned: Any) -> tuple[str | None, Customer | None]:
    """customer_lookup.lua's owner entry ('' or nil: nobody claimed the key) and the owner's
    document: the owner's id and its customer, when stored and not deleted."""
    claim = text(entry) if entry else ""
    if not claim:
        return None, None
    owner = Claim.parse(claim).owner
    return owner, _live(document(owner, _flat(owned)))
