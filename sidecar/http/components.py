"""The long-lived collaborators every handler reaches through the app: typed AppKeys, one place.

They are composed once, by ``open_components``, which `sidecar run` (runtime/server.py) and the
tests share: the store a --redis URL names, opened as one client stack (the hot path's script
batcher and one redis-py pool for everything else: billing, stored customers, the journal),
the metrics, and the customer directory over the store's stored customers. ``compose`` is its
half that opens nothing, for a store opened already.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from sidecar.admission.customers import CustomerDirectory
from sidecar.admission.deny_cache import DenyCache
from sidecar.billing.marks import DirtyMarks
from sidecar.config.policy.holder import PolicyHolder
from sidecar.config.settings import Settings
from sidecar.http.upstream import UpstreamPool
from sidecar.ledger.journal import Journal
from sidecar.metrics import Metrics
from sidecar.store.port import OutboxStore, Store
from sidecar.store.redis.store import RedisStore


@dataclass(frozen=True, slots=True)
class Components:
    settings: Settings
    holder: PolicyHolder
    store: Store
    metrics: Metrics
    directory: CustomerDirectory
    marks: DirtyMarks = field(default_factory=DirtyMarks)
    denials: DenyCache = field(default_factory=DenyCache)
    journal: Journal | None = None  # None: usage the store cannot take is lost (and counted)

    @property
    def outbox(self) -> OutboxStore:
        """The billing outboxes: the store's own, on its one client."""
        return self.store.outbox


def compose(
    settings: Settings, holder: PolicyHolder, store: Store, *, journal: Journal | None = None
) -> Components:
    """The components around a store opened already (the caller closes it)."""
    metrics = Metrics()
    # A store that counts its hot-path traffic (RedisStore.traffic) has it exported.
    metrics.store_traffic.source = getattr(store, "traffic", None)
    directory = CustomerDirectory(store.customers)
    return Components(
        settings=settings, holder=holder, store=store, metrics=metrics, directory=directory, journal=journal
    )


@asynccontextmanager
async def open_components(
    settings: Settings, holder: PolicyHolder, url: str, *, journal: Journal | None = None
) -> AsyncIterator[Components]:
    """Open the store ``url`` names and compose the components around it; the store is closed
    when the block ends. It connects first, so the first requests do not wait for a connection
    (a store that is down is only logged: requests retry it)."""
    store = RedisStore.open(url, settings.store_timeout)
    try:
        await store.connect()
        yield compose(settings, holder, store, journal=journal)
    finally:
        await store.close()


COMPONENTS = web.AppKey("components", Components)
# The upstream pool forwards requests; the ClientSession relays WebSocket upgrades only.
UPSTREAM = web.AppKey("upstream", UpstreamPool)
SESSION = web.AppKey("session", aiohttp.ClientSession)
