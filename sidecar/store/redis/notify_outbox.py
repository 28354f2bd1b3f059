"""The notification side of the store: the outboxes the metering scripts record crossings into
(notify_lib.lua), the schedule that leases each customer to one notifier at a time, settling,
dead letters and the recent list the inspection page shows.

Like the billing outbox (outbox.py), a notification is always in an outbox or a dead-letter hash
until the receiver acknowledged it, each move one script on the customer's keys, and the shared
schedules (NOTIFY_PENDING, NOTIFY_DEAD) are only indexes: ``rebuild_schedule`` finds every
outbox again by scanning. The hot path writes no index: a metering reply says it recorded a
notification, ``note`` keeps the customer in memory, and the notifier schedules the noted ones
once a second.
"""

from __future__ import annotations

import json
from typing import cast

from sidecar.errors import StoreUnavailable
from sidecar.store.notifications import RECENT_KEPT, Notification
from sidecar.store.redis import keys
from sidecar.store.redis.calls import BACKGROUND_TIMEOUT, bounded, load_script
from sidecar.store.redis.topology import StoreClient

_SCAN_BATCH = 1000


class NotifyOutbox:
    """The NotifyStore of store/notifications.py, over Redis."""

    def __init__(self, client: StoreClient, *, timeout: float = BACKGROUND_TIMEOUT) -> None:
        self.client = client
        self._timeout = timeout
        self._noted: set[str] = set()
        self._claim = client.register_script(load_script("claim", shared=False))
        self._release = client.register_script(load_script("release", shared=False))
        self._settle = client.register_script(load_script("notify_settle", shared=False))
        self._redrive = client.register_script(load_script("notify_redrive", shared=False))

    def note(self, customer: str) -> None:
        self._noted.add(customer)

    async def schedule_noted(self, at_ms: int) -> int:
        """Due at ``at_ms``, overriding a lease, so a notification recorded while another replica
        delivers the customer's earlier ones is not left behind; kept noted if the store fails."""
        noted, self._noted = self._noted, set()
        if not noted:
            return 0
        try:
            await bounded(self.client.zadd(keys.NOTIFY_PENDING, dict.fromkeys(noted, at_ms)), self._timeout)
        except StoreUnavailable:
            self._noted |= noted
            raise
        return len(noted)

    async def claim(self, now_ms: int, lease_end_ms: int, limit: int) -> list[str]:
        claimed = await bounded(
            self._claim(keys=[keys.NOTIFY_PENDING], args=[now_ms, lease_end_ms, limit]), self._timeout
        )
        return [bytes(member).decode() for member in claimed]

    async def release(self, customer: str, lease_end_ms: int, due_ms: int | None) -> bool:
        args: list[str | int] = [customer, lease_end_ms, "" if due_ms is None else due_ms]
        return bool(await bounded(self._release(keys=[keys.NOTIFY_PENDING], args=args), self._timeout))

    async def pending(self, customer: str) -> list[Notification]:
        stored = await bounded(self.client.hgetall(keys.notify_outbox(customer)), self._timeout)
        found = [Notification.from_record(customer, _text(k), v) for k, v in stored.items()]
        return sorted(found, key=lambda n: (n.at, n.used, n.threshold, n.crossing))

    async def settle(
        self, customer: str, crossings: tuple[str, ...], *, dead_reason: str | None = None
    ) -> int:
        key_list = [keys.notify_outbox(customer), keys.notify_dead(customer)]
        args = ["ack" if dead_reason is None else "dead", dead_reason or "", *crossings]
        remaining = int(await bounded(self._settle(keys=key_list, args=args), self._timeout))
        if dead_reason is not None:
            await bounded(self.client.zadd(keys.NOTIFY_DEAD, {customer: 0}), self._timeout)
        return remaining

    async def dead_letters(self) -> list[tuple[Notification, str]]:
        letters = []
        for customer in await self._members(keys.NOTIFY_DEAD):
            stored = await bounded(self.client.hgetall(keys.notify_dead(customer)), self._timeout)
            for crossing, letter in stored.items():
                fields = json.loads(letter)
                notice = Notification.from_record(customer, _text(crossing), fields["record"])
                letters.append((notice, str(fields["reason"])))
        return letters

    async def redrive(self, now_ms: int) -> int:
        moved = 0
        for customer in await self._members(keys.NOTIFY_DEAD):
            key_list = [keys.notify_dead(customer), keys.notify_outbox(customer)]
            moved += int(await bounded(self._redrive(keys=key_list), self._timeout))
            await bounded(self.client.zrem(keys.NOTIFY_DEAD, customer), self._timeout)
            await bounded(self.client.zadd(keys.NOTIFY_PENDING, {customer: now_ms}), self._timeout)
        return moved

    async def recent(self, customer: str) -> list[Notification]:
        """Each entry of the recent list is "<crossing> <record>" (notify_lib.lua record_crossing)."""
        stored = await bounded(
            self.client.lrange(keys.notify_recent(customer), 0, RECENT_KEPT - 1), self._timeout
        )
        entries = [_text(entry).partition(" ") for entry in stored]
        return [Notification.from_record(customer, crossing, record) for crossing, _, record in entries]

    async def waiting(self) -> int:
        return int(await bounded(self.client.zcard(keys.NOTIFY_PENDING), self._timeout))

    async def rebuild_schedule(self) -> None:
        """Every outbox found by scanning is scheduled (NX: a lease or a due time stands)."""
        found = [
            keys.customer_of(key.decode())
            async for key in self.client.scan_iter(match=keys.NOTIFY_PATTERN, count=_SCAN_BATCH)
        ]
        if found:
            await bounded(
                self.client.zadd(keys.NOTIFY_PENDING, dict.fromkeys(found, 0), nx=True), self._timeout
            )

    async def _members(self, schedule: str) -> list[str]:
        members = await bounded(self.client.zrange(schedule, 0, -1), self._timeout)
        return [member.decode() for member in cast(list[bytes], members)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
