"""Pages of stored customers in id order, from the listing index's INDEX_BUCKETS sorted sets.

Why sorted sets and not SCAN: a prefix is a range of a set ordered by id (ZRANGEBYLEX, O(log N)
plus the page), whereas SCAN with MATCH walks every key of every node, counters included, to
find a few ids. Why buckets: one set would put ten million ids on one Cluster slot.

A page asks every bucket for the ids after the cursor, a few more than its share of the page,
and keeps the ids up to the smallest "last id" among the buckets that had more: below that
every bucket's ids are all known, so the page is in order and nothing is skipped. The documents
are then read (one pipelined round trip) for the plan and the keys; an id whose document is gone
(a writer died between index and document) is passed over. A plan filter reads at most
SCAN_BUDGET ids per call and may answer a short page with a cursor to go on from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from sidecar.config.policy.model import Customer
from sidecar.store.port import StoredPage
from sidecar.store.redis import keys
from sidecar.store.redis.pipeline import Script

SCAN_BUDGET = 5000  # ids a page with a plan filter looks at, at most
_TOP = "\U0010ffff"  # sorts after every id (ids are ASCII)

Documents = Callable[[Sequence[str]], Awaitable[dict[str, Customer]]]


class Listing:
    def __init__(self, ranged: Script, documents: Documents) -> None:
        self._range = ranged
        self._documents = documents

    async def page(self, prefix: str, after: str, limit: int, plan: str | None) -> StoredPage:
        found: list[Customer] = []
        looked, more = 0, True
        cursor = after
        while more and len(found) < limit and looked < max(limit, SCAN_BUDGET if plan else limit):
            ids, more = await self._ids(prefix, cursor, limit - len(found))
            documents = await self._documents(ids)
            for customer_id in ids:
                customer = documents.get(customer_id)
                if customer is not None and (plan is None or customer.plan == plan):
                    found.append(customer)
            looked += len(ids)
            cursor = ids[-1] if ids else cursor
        return StoredPage(tuple(found), cursor, more)

    async def _ids(self, prefix: str, after: str, limit: int) -> tuple[list[str], bool]:
        """Up to ``limit`` ids after ``after`` starting with ``prefix``, in order, and whether
        more may follow."""
        share = min(limit, 2 * limit // keys.INDEX_BUCKETS + 8)
        low = f"({after}" if after and after >= prefix else f"[{prefix}" if prefix else "-"
        high = f"[{prefix}{_TOP}" if prefix else "+"
        calls = [self._range([keys.customer_index(b)], [low, high, share]) for b in range(keys.INDEX_BUCKETS)]
        replies = [[member.decode() for member in reply] for reply in await asyncio.gather(*calls)]
        full = [reply[-1] for reply in replies if len(reply) == share]
        cutoff = min(full) if full else None
        ids = sorted(i for reply in replies for i in reply if cutoff is None or i <= cutoff)
        if len(ids) > limit:
            return ids[:limit], True
        return ids, cutoff is not None
