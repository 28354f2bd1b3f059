"""The changes feed: one Redis stream entry per customer change, read by every replica.

Why a stream rather than pub/sub: a replica that loses its connection for a moment reads on
from where it was (XREAD after its last entry id) instead of having missed what was said
meanwhile; only when entries it had not read were trimmed (older than KEEP_MS) must it drop its
whole cache. The stream is one key (one Cluster slot), small: an entry names the customers that
changed, not their documents.

An entry's fields: ``c`` the customer ids, ``k`` API key hashes that were added, ``n`` = 1 when
every unknown key must be forgotten (an import batch, whose keys are not listed). Ids and hex
digests contain no spaces, so each list is space-separated.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

from sidecar.errors import StoreUnavailable
from sidecar.store.port import CustomerChange, FeedRead
from sidecar.store.redis import keys
from sidecar.store.redis.calls import bounded
from sidecar.store.redis.pipeline import Script
from sidecar.store.redis.topology import StoreClient

log = logging.getLogger("sidecar.store.customers")
KEEP_MS = 300_000  # entries older than this are trimmed as new ones are added
READ_COUNT = 500  # entries one read returns at most
START = "0-0"


class Feed:
    def __init__(self, client: StoreClient, changed: Script, *, timeout: float) -> None:
        self.client = client
        self._changed = changed
        self._timeout = timeout

    async def announce(self, change: CustomerChange) -> None:
        """Add one entry. The change is made already; a failure here is logged, not raised:
        replicas then see the change when their cached entries expire (customers.py, TTL)."""
        if not change.customers and not change.key_hashes:
            return
        pairs = ["c", " ".join(change.customers)]
        if change.key_hashes:
            pairs += ["k", " ".join(change.key_hashes)]
        if change.unknown_keys:
            pairs += ["n", "1"]
        oldest = f"{int(time.time() * 1000) - KEEP_MS}-0"
        try:
            await self._changed([keys.CHANGES], [oldest, *pairs])
        except StoreUnavailable as error:
            log.warning(
                "a customer change was made but not announced (%s); replicas see it within their cache TTL",
                error,
            )

    async def position(self) -> str:
        """The id of the feed's last entry (START when it has none)."""
        last = await bounded(self.client.xrevrange(keys.CHANGES, count=1), self._timeout)
        entries = cast(list[tuple[bytes, Any]], last)
        return entries[0][0].decode() if entries else START

    async def read(self, after: str, wait: float, *, check_gap: bool = False) -> FeedRead:
        """The entries after ``after``, waiting up to ``wait`` seconds for the first one. With
        ``check_gap`` (after a failed read), first whether entries after ``after`` were trimmed."""
        gap = check_gap and await self._trimmed_since(after)
        block = max(1, int(wait * 1000))
        reply = await bounded(
            self.client.xread({keys.CHANGES: after}, count=READ_COUNT, block=block), self._timeout + wait
        )
        entries = _entries(reply)
        position = entries[-1][0].decode() if entries else after
        return FeedRead(position, tuple(_change(values) for _, values in entries), gap)

    async def _trimmed_since(self, after: str) -> bool:
        first = cast(
            list[tuple[bytes, Any]], await bounded(self.client.xrange(keys.CHANGES, count=1), self._timeout)
        )
        if not first:  # never written, or deleted: only the latter loses anything
            return after != START
        # Entries after ours trimmed, or the stream went back (a failover lost what we read).
        return _id(first[0][0].decode()) > _id(after) or _id(await self.position()) < _id(after)


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREAD's reply (a list of [stream, entries], or a dict under RESP3) as the entries."""
    if not reply:
        return []
    streams = reply.items() if isinstance(reply, dict) else reply
    return [entry for _, found in streams for entry in (found[0] if isinstance(reply, dict) else found)]


def _change(values: dict[bytes, bytes]) -> CustomerChange:
    return CustomerChange(
        customers=tuple(values.get(b"c", b"").decode().split()),
        key_hashes=tuple(values.get(b"k", b"").decode().split()),
        unknown_keys=values.get(b"n") == b"1",
    )


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
