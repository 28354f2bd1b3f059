"""Claims on API keys: how a key comes to belong to one customer fleet-wide, and is given back.

Every key hash has an owner entry of its own (keys.key_owner), so the index spreads over a
Cluster; a customer's document lives on the customer's slot. One script cannot touch both on a
Cluster, so a write claims its keys first (customer_claim.lua: a compare-and-set; the first of
two racing writers wins, the second finds the key held), writes the document after, and gives
back what it no longer lists (customer_unclaim.lua). Each write stamps its claims with a token of
its own, which the document records per key: a give-back takes a key only from the write that
stamped it, never from a later write of the same customer that re-stamped it.

The claims of many writes go in few calls: on one server up to MAX_ITEMS keys a call, on a
Cluster the keys of one slot a call (``per_item``); each key is still claimed on its own.

A writer that dies between its claims and its document leaves claims its owner's document does
not list. Lookups ignore them (the directory checks the document), and once older than
STALE_CLAIM_MS another customer may take them over (``claim`` tries again, naming the stale
entry, which the script replaces only if it is still exactly that). A write slower than WRITE_MS
from its first claim writes no document (customer_put.lua), so it cannot race a takeover.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot

from sidecar.store.redis import keys
from sidecar.store.redis.customer_docs import Claim, Document
from sidecar.store.redis.pipeline import Script
from sidecar.store.redis.topology import Arg

WRITE_MS = 30_000  # the longest a write may take from its first claim to its document
STALE_CLAIM_MS = 60_000  # an older claim its owner's document does not list is a dead writer's

MAX_ITEMS = 100  # items (keys claimed, documents written) one script call carries at most
Documents = Callable[[Sequence[str]], Awaitable[dict[str, Document]]]


@dataclass(frozen=True, slots=True)
class Write:
    """Which keys one write claims, for whom, under which token."""

    customer_id: str
    key_hashes: tuple[str, ...]
    token: str


@dataclass(frozen=True, slots=True)
class Claimed:
    """A write's claims as the claim script answered each: [1 claimed | 0 held, now (ms), the
    entry before (claimed) or the entry that holds it (held)]; ``refused``, each key held by
    another customer (its index in the write's keys, and that customer); ``first_ms``, when the
    first claim was made (store clock; 0 when the write claims no key)."""

    write: Write
    replies: tuple[Any, ...]
    refused: tuple[tuple[int, str], ...]
    first_ms: int

    @classmethod
    def of(cls, write: Write, replies: tuple[Any, ...]) -> Claimed:
        refused = tuple((i, Claim.parse(text(r[2])).owner) for i, r in enumerate(replies) if not r[0])
        return cls(write, replies, refused, min(r[1] for r in replies) if replies else 0)


class Claims:
    def __init__(self, claim: Script, unclaim: Script, documents: Documents, *, sharded: bool) -> None:
        self._claim = claim
        self._unclaim = unclaim
        self._documents = documents
        self._sharded = sharded

    async def claim(self, writes: Sequence[Write]) -> list[Claimed]:
        """Claim every write's keys, in as few calls as the topology allows; a dead writer's stale
        claim is taken over."""
        flat = [(write, key_hash) for write in writes for key_hash in write.key_hashes]
        replies = await per_item(self._claim, [_claiming(w, h) for w, h in flat], sharded=self._sharded)
        replies = await self._take_over_stale(flat, replies)
        claimed, at = [], 0
        for write in writes:
            claimed.append(Claimed.of(write, tuple(replies[at : at + len(write.key_hashes)])))
            at += len(write.key_hashes)
        return claimed

    async def _take_over_stale(self, flat: list[tuple[Write, str]], replies: list[Any]) -> list[Any]:
        refused = [i for i, r in enumerate(replies) if not int(r[0])]
        if not refused:
            return replies
        owners = await self._documents([Claim.parse(text(replies[i][2])).owner for i in refused])
        stale = [i for i in refused if self._stale(flat[i][1], replies[i], owners)]
        items = [_claiming(*flat[i], text(replies[i][2])) for i in stale]
        retried = await per_item(self._claim, items, sharded=self._sharded)
        replies = list(replies)
        for i, reply in zip(stale, retried, strict=True):
            replies[i] = reply
        return replies

    @staticmethod
    def _stale(key_hash: str, reply: Any, owners: dict[str, Document]) -> bool:
        """A claim its owner's document does not list, older than any live write."""
        claim = Claim.parse(text(reply[2]))
        owner = owners.get(claim.owner)
        listed = owner is not None and not owner.deleted and key_hash in owner.tokens
        return not listed and int(reply[1]) - claim.at_ms > STALE_CLAIM_MS

    @staticmethod
    def undo(claimed: Claimed) -> list[Item]:
        """The give-backs of a write that wrote nothing, putting back what the customer's own
        entry held before (its document still lists those keys)."""
        write, undo = claimed.write, []
        for key_hash, reply in zip(write.key_hashes, claimed.replies, strict=True):
            if int(reply[0]):
                before = text(reply[2])
                restore = before if before and Claim.parse(before).owner == write.customer_id else ""
                undo.append(give_back(write.customer_id, key_hash, write.token, restore))
        return undo

    async def release(self, items: Sequence[Item]) -> None:
        """Run give-backs (``undo``, ``give_back``), in as few calls as the topology allows."""
        if items:
            await per_item(self._unclaim, items, sharded=self._sharded)


def give_back(customer_id: str, key_hash: str, token: str, restore: str = "") -> Item:
    """Delete a key's owner entry (or put ``restore`` back), if ``token`` still holds it."""
    return Item((keys.key_owner(key_hash),), (customer_id, token, restore))


def _claiming(write: Write, key_hash: str, stale: str = "") -> Item:
    claim = f"{write.customer_id} {write.token} {stale}" if stale else f"{write.customer_id} {write.token}"
    return Item((keys.key_owner(key_hash),), (claim,))


@dataclass(frozen=True, slots=True)
class Item:
    """One item of a script that takes several: its keys (of one slot) and its arguments."""

    keys: tuple[str, ...]
    args: tuple[Arg, ...]


async def per_item(
    script: Script, items: Sequence[Item], *, sharded: bool, head: Sequence[Arg] = ()
) -> list[Any]:
    """Each item's reply, from one call per group of items: on one server up to MAX_ITEMS of them
    in order; on a Cluster those of one slot (a script's keys must share one). The script takes
    ``head`` then the items' arguments in order, and answers one reply per item."""
    groups: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        group = key_slot(item.keys[0].encode()) if sharded else index // MAX_ITEMS
        groups.setdefault(group, []).append(index)
    calls, chunks = [], []
    for members in groups.values():
        for at in range(0, len(members), MAX_ITEMS):
            chunk = members[at : at + MAX_ITEMS]
            keys_ = [k for i in chunk for k in items[i].keys]
            calls.append(script(keys_, [*head, *(a for i in chunk for a in items[i].args)]))
            chunks.append(chunk)
    found: list[Any] = [None] * len(items)
    for chunk, replies in zip(chunks, await gathered(calls), strict=True):
        for index, reply in zip(chunk, replies, strict=True):
            found[index] = reply
    return found


async def gathered(calls: Sequence[Awaitable[Any]]) -> list[Any]:
    """Every call's reply, in order; the first failure raised once all have settled. Script calls
    are futures already, so no task is made for each (an import makes millions)."""
    replies = await asyncio.gather(*calls, return_exceptions=True)
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    return list(replies)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
