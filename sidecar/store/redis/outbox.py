"""The billing side of the store: close finished windows into per-customer outboxes, lease them
to one pusher at a time, and settle them once billing has answered.

Every per-customer step is one atomic script on that customer's keys (one cluster slot). The
shared schedules (DIRTY, PENDING, DEAD) are only indexes: a unit is always in a usage hash, an
outbox or a dead-letter hash, and ``rebuild_schedules`` finds every such key again by scanning,
so a replica dying between a script and an index update delays a summary, never loses it.

It runs on the store's one redis-py client (RedisStore.outbox), each call bounded by
BACKGROUND_TIMEOUT rather than the store timeout: billing is off the request path, and a busy
store should delay it, not fail it (calls.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, cast

from sidecar.config.policy.notifications import DEFAULT_HISTORY_DAYS
from sidecar.errors import UnansweredCall
from sidecar.store.port import FENCED
from sidecar.store.redis import keys
from sidecar.store.redis.calls import BACKGROUND_TIMEOUT, bounded, load_script
from sidecar.store.redis.topology import StoreClient
from sidecar.store.summaries import DEFAULT_NAMESPACE, Summary, id_namespace

__all__ = ["FENCED", "Outbox", "fence_member"]
_SCAN_BATCH = 1000


def fence_member(call: UnansweredCall) -> str:
    """The member a void puts in its customer's void fence (store/keys.py, void_fence)."""
    return f"{call.token}:{call.seq}"


class Outbox:
    """The OutboxStore of store/port.py, over Redis."""

    def __init__(self, client: StoreClient, *, timeout: float = BACKGROUND_TIMEOUT) -> None:
        self.client = client
        self._timeout = timeout
        self._close = client.register_script(load_script("close", shared=False))
        self._settle = client.register_script(load_script("settle_outbox", shared=False))
        self._redrive = client.register_script(load_script("redrive", shared=False))
        self._claim = client.register_script(load_script("claim", shared=False))
        self._release = client.register_script(load_script("release", shared=False))
        self._fence = client.register_script(load_script("fence"))

    async def mark_dirty(self, dues: Mapping[str, int]) -> None:
        """Schedule each customer's window closing; an earlier due time wins (ZADD LT)."""
        if dues:
            await bounded(self.client.zadd(keys.DIRTY, dict(dues), lt=True), self._timeout)

    async def due_dirty(self, now_ms: int, limit: int) -> list[tuple[str, int]]:
        due = await bounded(
            self.client.zrangebyscore(keys.DIRTY, "-inf", now_ms, start=0, num=limit, withscores=True),
            self._timeout,
        )
        pairs = cast(list[tuple[bytes, float]], due)
        return [(member.decode(), int(score)) for member, score in pairs]

    async def close(
        self,
        customer: str,
        plan: str,
        interval: int,
        cutoff: int,
        aggregations: Mapping[str, str],
        *,
        anchor_day: int = 1,
        namespace: str = DEFAULT_NAMESPACE,
        history_days: int = DEFAULT_HISTORY_DAYS,
    ) -> tuple[int, int | None]:
        """Move every window ended by `cutoff` into the outbox: (moved, earliest open window), or
        (FENCED, None) while a void fence is set for the customer (fence). A unique meter's
        values count in the billing month (starting on `anchor_day`) they are first closed in;
        `namespace` enters the summary ids; each summary is kept `history_days` as usage history
        (close.lua, history.py)."""
        key_list = [
            keys.usage(customer),
            keys.revisions(customer),
            keys.outbox(customer),
            keys.void_fence(customer),
        ]
        args: list[Any] = [customer, plan, interval, cutoff, anchor_day, id_namespace(namespace)]
        args.append(history_days)  # close.lua ARGV[7]
        for meter, aggregation in aggregations.items():
            args += (meter, aggregation)
        moved, open_window = await bounded(self._close(keys=key_list, args=args), self._timeout)
        return int(moved), None if int(open_window) < 0 else int(open_window)

    async def fence(self, customer: str, void: UnansweredCall, seconds: int) -> bool:
        """Keep the customer's windows open in every replica (close.lua) while this void may have
        something to undo, for `seconds` unless renewed; False when it has nothing (fence.lua)."""
        key_list = [keys.call_records(customer, void.token), keys.void_fence(customer)]
        args: list[str | int] = [void.seq, void.deadline_us, fence_member(void), seconds]
        return bool(await bounded(self._fence(keys=key_list, args=args), self._timeout))

    async def reschedule(self, schedule: str, customer: str, seen: int, new: int | None) -> bool:
        """Remove (new None) or reschedule a member, only if nobody changed it since it was `seen`."""
        return await self.reschedule_many(schedule, [(customer, seen, new)]) == 1

    async def reschedule_many(self, schedule: str, moves: Sequence[tuple[str, int, int | None]]) -> int:
        args: list[str | int] = []
        for customer, seen, new in moves:
            args += (customer, seen, "" if new is None else new)
        if not args:
            return 0
        return int(await bounded(self._release(keys=[schedule], args=args), self._timeout))

    async def schedule_push(self, customer: str, at_ms: int) -> None:
        """Due for pushing at `at_ms`; overrides a lease, so new summaries are never left behind."""
        await bounded(self.client.zadd(keys.PENDING, {customer: at_ms}), self._timeout)

    async def claim_pending(self, now_ms: int, lease_end_ms: int, limit: int) -> list[str]:
        args = [now_ms, lease_end_ms, limit]
        claimed = await bounded(self._claim(keys=[keys.PENDING], args=args), self._timeout)
        return [bytes(member).decode() for member in claimed]

    async def summaries(self, customer: str) -> list[Summary]:
        stored = await bounded(self.client.hvals(keys.outbox(customer)), self._timeout)
        return [Summary(**json.loads(value)) for value in stored]

    async def summaries_of(self, customers: Sequence[str]) -> list[list[Summary]]:
        if not customers:
            return []
        pipe = self.client.pipeline(transaction=False)
        for customer in customers:
            pipe.hvals(keys.outbox(customer))
        stored = await bounded(pipe.execute(), self._timeout)
        return [[Summary(**json.loads(value)) for value in values] for values in stored]

    async def settle(self, customer: str, ids: tuple[str, ...], *, dead_reason: str | None = None) -> int:
        """Delete delivered summaries, or dead-letter them with a reason; returns how many remain."""
        key_list = [keys.outbox(customer), keys.dead_letters(customer)]
        args = ["ack" if dead_reason is None else "dead", dead_reason or "", *ids]
        remaining = int(await bounded(self._settle(keys=key_list, args=args), self._timeout))
        if dead_reason is not None:
            await bounded(self.client.zadd(keys.DEAD, {customer: 0}), self._timeout)
        return remaining

    async def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead letter: the summary as it would have been sent, and why billing refused it."""
        letters = []
        for customer in await self._members(keys.DEAD):
            stored = await bounded(self.client.hvals(keys.dead_letters(customer)), self._timeout)
            letters += [json.loads(value) for value in stored]
        return letters

    async def redrive(self, now_ms: int) -> int:
        """Move every dead letter back into its outbox (same id, same value) and schedule a push."""
        moved = 0
        for customer in await self._members(keys.DEAD):
            key_list = [keys.dead_letters(customer), keys.outbox(customer)]
            moved += int(await bounded(self._redrive(keys=key_list), self._timeout))
            await bounded(self.client.zrem(keys.DEAD, customer), self._timeout)
            await self.schedule_push(customer, now_ms)
        return moved

    async def pending_summaries(self, limit: int = 1000) -> int:
        """Summaries waiting in the outboxes of (at most `limit`) pending customers."""
        customers = await self._members(keys.PENDING, limit)
        pipe = self.client.pipeline(transaction=False)
        for customer in customers:
            pipe.hlen(keys.outbox(customer))
        return sum(await bounded(pipe.execute(), self._timeout)) if customers else 0

    async def _members(self, schedule: str, limit: int = 0) -> list[str]:
        members = await bounded(self.client.zrange(schedule, 0, limit - 1), self._timeout)
        return [member.decode() for member in cast(list[bytes], members)]

    async def rebuild_schedules(self) -> None:
        """Find every usage hash and outbox by scanning and make sure each is scheduled (NX)."""
        for pattern, schedule in ((keys.USAGE_PATTERN, keys.DIRTY), (keys.OUTBOX_PATTERN, keys.PENDING)):
            found = [
                keys.customer_of(key.decode())
                async for key in self.client.scan_iter(match=pattern, count=_SCAN_BATCH)
            ]
            if found:
                await bounded(self.client.zadd(schedule, dict.fromkeys(found, 0), nx=True), self._timeout)
