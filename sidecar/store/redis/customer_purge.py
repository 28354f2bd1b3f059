"""The purge of a deleted customer (the right to erasure): every key of the customer, erased once
nothing of it waits for billing.

DELETE with ``purge`` sets the customer's purge marker and schedules it in PURGES (a sorted set
scored by when it is due). Any replica's directory runs the due ones (``run_due``), each leased
for LEASE_MS so that two replicas do not work on one: while the customer's usage hash, outbox
or void fence exists (its last windows not yet closed, summaries not yet delivered, a journal
still fencing them) it is looked at again RETRY_MS later; then its keys are found on its own
slot (CLUSTER GETKEYSINSLOT on a Cluster, SCAN with the customer's prefix on one server) and
erased in chunks by customer_erase.lua, which stops when a PUT has brought the customer back
(the PUT takes the marker away). Dead letters are not waited for: billing refused them for good.
"""

from __future__ import annotations

import time
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from sidecar.store.port import Purged
from sidecar.store.redis import keys
from sidecar.store.redis.calls import bounded
from sidecar.store.redis.pipeline import Script
from sidecar.store.redis.topology import StoreClient

LEASE_MS = 60_000
RETRY_MS = 15_000
PER_RUN = 10  # purges one run takes on
ERASE_CHUNK = 200  # keys one erase call deletes
SCAN_COUNT = 1000


class Purges:
    def __init__(self, client: StoreClient, lease: Script, erase: Script, *, timeout: float) -> None:
        self.client = client
        self._lease = lease
        self._erase = erase
        self._timeout = timeout

    async def schedule(self, customer_id: str) -> None:
        await bounded(self.client.zadd(keys.PURGES, {customer_id: _now_ms()}), self._timeout)

    async def run_due(self, *, wait_for_billing: bool) -> list[Purged]:
        now = _now_ms()
        due = await self._lease([keys.PURGES], [now, now + LEASE_MS, PER_RUN])
        done = []
        for member in due:
            purged = await self._purge(member.decode(), wait_for_billing)
            if purged is not None:
                done.append(purged)
        return done

    async def _purge(self, customer_id: str, wait_for_billing: bool) -> Purged | None:
        if wait_for_billing and await self._waits_for_billing(customer_id):
            await bounded(self.client.zadd(keys.PURGES, {customer_id: _now_ms() + RETRY_MS}), self._timeout)
            return None
        fixed = [keys.customer_purge(customer_id), keys.customer(customer_id)]
        found = [name for name in await self._keys_of(customer_id) if name not in fixed]
        erased = 0
        for at in range(0, len(found), ERASE_CHUNK):
            deleted = int(await self._erase([*fixed, *found[at : at + ERASE_CHUNK]], ["0"]))
            if deleted < 0:
                await self._cancelled(customer_id)
                return None
            erased += deleted
        deleted = int(await self._erase(fixed, ["1"]))
        if deleted < 0:
            await self._cancelled(customer_id)
            return None
        await self._forget(customer_id)
        return Purged(customer_id, erased + deleted)

    async def _waits_for_billing(self, customer_id: str) -> bool:
        waiting = (keys.usage(customer_id), keys.outbox(customer_id), keys.void_fence(customer_id))
        return bool(await bounded(self.client.exists(*waiting), self._timeout))

    async def _keys_of(self, customer_id: str) -> list[str]:
        """Every key of the customer, read from its slot only on a Cluster."""
        prefix = keys.customer_prefix(customer_id)
        if isinstance(self.client, RedisCluster):
            names = await self._slot_keys(self.client, keys.customer(customer_id))
        else:
            scan = self.client.scan_iter(match=f"{prefix}*", count=SCAN_COUNT)
            names = [name async for name in scan]
        return sorted({text for name in names if (text := _text(name)).startswith(prefix)})

    async def _slot_keys(self, cluster: RedisCluster, key: str) -> list[Any]:
        slot = key_slot(key.encode())
        await bounded(cluster.initialize(), self._timeout)  # at once unless not done yet
        node = cluster.get_node_from_key(key)
        count = await bounded(
            cluster.execute_command("CLUSTER COUNTKEYSINSLOT", slot, target_nodes=node), self._timeout
        )
        listed = cluster.execute_command("CLUSTER GETKEYSINSLOT", slot, int(count), target_nodes=node)
        return cast(list[Any], await bounded(listed, self._timeout))

    async def _cancelled(self, customer_id: str) -> None:
        await bounded(self.client.zrem(keys.PURGES, customer_id), self._timeout)

    async def _forget(self, customer_id: str) -> None:
        """Out of the purge schedule and the billing schedules (which only index keys now gone)."""
        for schedule in (keys.PURGES, keys.DIRTY, keys.PENDING, keys.DEAD):
            await bounded(self.client.zrem(schedule, customer_id), self._timeout)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
