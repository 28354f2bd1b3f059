"""billing.namespace (SPEC §6): it enters every summary id, close.lua and summary_id agreeing, and
is the CloudEvents source, so two deployments feeding one account never deduplicate each other; the
default keeps the ids of before; a summary keeps the namespace it closed with, resends included.
Real redis-server, the real pusher, a receiver on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.admission.customers import CustomerDirectory
from sidecar.billing.marks import DirtyMarks
from sidecar.billing.pusher import Pusher
from sidecar.billing.sender import http_session
from sidecar.config.policy.holder import PolicyHolder
from sidecar.config.policy.loader import load_policy
from sidecar.metrics import Metrics
from sidecar.store.redis.store import RedisStore
from sidecar.store.summaries import summary_id
from tests.billing.test_outbox import record
from tests.conftest import write_policy

ServerFactory = Callable[..., Awaitable[TestServer]]
AGGREGATIONS = {"requests": "count"}


async def closed_ids(store: RedisStore, namespace: str | None) -> tuple[int, list[str]]:
    """Record 3 requests, close the window under `namespace` (None: the default); its summaries."""
    window = await record(store, "acme", ("requests", "search", 3))
    if namespace is None:
        await store.outbox.close("acme", "pro", 60, window + 60, AGGREGATIONS)
    else:
        await store.outbox.close("acme", "pro", 60, window + 60, AGGREGATIONS, namespace=namespace)
    summaries = await store.outbox.summaries("acme")
    assert [s.namespace for s in summaries] == [namespace or "quota-sidecar"]
    return window, [s.id for s in summaries]


async def test_close_lua_and_summary_id_agree_on_a_namespaced_id(store: RedisStore) -> None:
    window, ids = await closed_ids(store, "acme-prod")
    assert ids == [summary_id("acme", "requests", "search", window, 1, namespace="acme-prod")]


async def test_the_default_namespace_keeps_the_ids_of_before(store: RedisStore) -> None:
    window, ids = await closed_ids(store, None)
    assert ids == [hashlib.sha1(f"acme|requests|search|{window}|1".encode()).hexdigest()]


async def test_two_deployments_with_their_own_namespaces_never_share_an_id(store: RedisStore) -> None:
    """The same customer, meter, feature and window in two deployments (two stores)."""
    window, east = await closed_ids(store, "east")
    await store.client.flushdb()
    again, west = await closed_ids(store, "west")
    assert window == again and set(east).isdisjoint(west)


# -- on the wire ---------------------------------------------------------------------------------


class OpenMeterReceiver:
    """CloudEvents batches as they arrive; answers 500 to the first `failing` of them."""

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []
        self.failing = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        events = json.loads(await request.read())
        self.events += events
        if self.failing:
            self.failing -= 1
            return web.json_response({"title": "unavailable"}, status=500)
        return web.Response(status=204)


@pytest.fixture
async def receiver(aiohttp_server: ServerFactory) -> OpenMeterReceiver:
    receiver = OpenMeterReceiver()
    app = web.Application()
    app.router.add_post("/api/v1/events", receiver.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    receiver.url = str(server.make_url("/api/v1/events"))
    return receiver


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with http_session() as client:
        yield client


def policy_text(url: str, namespace: str) -> str:
    return f"""
version: 1
meters: {{requests: {{aggregation: count}}}}
features: [{{name: search, match: {{path: /v1/search}}}}]
plans: {{pro: {{features: [search]}}}}
customers: {{acme: {{plan: pro}}}}
billing: {{url: "{url}", format: openmeter, interval: 60, grace: 0, namespace: {namespace}}}
"""


def pusher_for(store: RedisStore, session: aiohttp.ClientSession, holder: PolicyHolder) -> Pusher:
    return Pusher(
        holder=holder,
        outbox=store.outbox,
        marks=DirtyMarks(),
        session=session,
        metrics=Metrics(),
        clock=lambda: store.time() + 120,  # the window ended a minute ago
        directory=CustomerDirectory(store.customers),
        backoff_base=0.01,
    )


async def test_the_cloudevents_source_is_the_namespace_and_a_resend_keeps_it_after_a_change(
    store: RedisStore, session: aiohttp.ClientSession, receiver: OpenMeterReceiver, tmp_path: Path
) -> None:
    """Closed under 'ns-a' and refused once; the namespace then changes to 'ns-b': the resend
    still carries ns-a's id and source, so OpenMeter, deduplicating on (id, source), counts it
    once. Usage closed after the change goes out under ns-b."""
    path = write_policy(tmp_path, policy_text(receiver.url, "ns-a"))
    holder = PolicyHolder.load(path)
    pusher = pusher_for(store, session, holder)
    window = await record(store, "acme", ("requests", "search", 2))
    await store.outbox.mark_dirty({"acme": 0})
    receiver.failing = 1
    await pusher.cycle()
    path.write_text(policy_text(receiver.url, "ns-b"))
    holder.reload()
    assert holder.current.billing is not None and holder.current.billing.namespace == "ns-b"
    for _ in range(50):
        await pusher.cycle()
        if len(receiver.events) == 2:
            break
    first, resent = receiver.events
    assert first == resent
    assert first["source"] == "ns-a"
    assert first["id"] == summary_id("acme", "requests", "search", window, 1, namespace="ns-a")

    later = await record(store, "acme", ("requests", "search", 1))
    await store.outbox.mark_dirty({"acme": 0})
    await pusher.cycle()
    newest = receiver.events[-1]
    assert newest["source"] == "ns-b"
    revision = 2 if later == window else 1  # a unit reaching a closed window is its amendment
    assert newest["id"] == summary_id("acme", "requests", "search", later, revision, namespace="ns-b")


def test_the_namespace_defaults_to_quota_sidecar(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, policy_text("https://openmeter.cloud/api/v1/events", "x")))
    assert policy.billing is not None and policy.billing.namespace == "x"
    text = policy_text("https://openmeter.cloud/api/v1/events", "x").replace(", namespace: x", "")
    default = load_policy(write_policy(tmp_path, text))
    assert default.billing is not None and default.billing.namespace == "quota-sidecar"
