"""The long-lived collaborators every handler reaches through the app: typed AppKeys, one place."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from sidecar.admission.customers import CustomerDirectory
from sidecar.admission.deny_cache import DenyCache
from sidecar.billing.marks import DirtyMarks
from sidecar.config.policy.holder import PolicyHolder
from sidecar.config.settings import Settings
from sidecar.ledger.journal import Journal
from sidecar.metrics import Metrics
from sidecar.store.port import Store
from sidecar.store.redis.outbox import Outbox


@dataclass(frozen=True, slots=True)
class Components:
    settings: Settings
    holder: PolicyHolder
    store: Store
    metrics: Metrics
    outbox: Outbox
    directory: CustomerDirectory
    marks: DirtyMarks = field(default_factory=DirtyMarks)
    denials: DenyCache = field(default_factory=DenyCache)
    journal: Journal | None = None  # None: usage the store cannot take is lost (and counted)


COMPONENTS = web.AppKey("components", Components)
SESSION = web.AppKey("session", aiohttp.ClientSession)
