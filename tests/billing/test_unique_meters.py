"""A unique meter through the real pusher (SPEC §6): each value is billed in the first window of the
customer's billing month it is seen in, the month starting on the customer's billing_anchor. Real
redis-server, a receiver on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.billing.sender import http_session
from sidecar.config.policy.holder import PolicyHolder
from sidecar.store.redis import keys
from sidecar.store.redis.store import RedisStore
from tests.billing.test_namespace import OpenMeterReceiver, ServerFactory, pusher_for
from tests.conftest import write_policy


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


def at(day: int, hour: int = 10) -> int:
    return int(datetime(2026, 3, day, hour, tzinfo=UTC).timestamp())


async def test_each_user_is_billed_once_in_each_billing_month_of_its_customer(
    store: RedisStore, session: aiohttp.ClientSession, receiver: OpenMeterReceiver, tmp_path: Path
) -> None:
    """ann is active on March 14, 16 and 20. acme's months start on the 15th: billed twice (the
    month to March 15, the month from it). bob's start on the 1st: billed once."""
    path = write_policy(
        tmp_path,
        f"""
        version: 1
        meters: {{users: {{aggregation: unique, source: "request.header:X-User"}}}}
        features: [{{name: search, match: {{path: /v1/search}}}}]
        plans: {{pro: {{features: [search]}}}}
        customers:
          acme: {{plan: pro, billing_anchor: "2026-01-15"}}
          bob: {{plan: pro}}
        billing: {{url: "{receiver.url}", format: openmeter, interval: 60, grace: 0}}
        """,
    )
    for customer in ("acme", "bob"):
        for window in (at(14), at(16), at(20)):
            await store.client.hincrby(keys.usage(customer), f"u|{window}|users|search|ann", 1)
        await store.outbox.mark_dirty({customer: 0})
    await pusher_for(store, session, PolicyHolder.load(path)).cycle()
    billed = {(e["subject"], e["time"]): e["data"]["value"] for e in receiver.events}  # type: ignore[index]
    assert billed == {
        ("acme", "2026-03-14T10:00:00Z"): 1,
        ("acme", "2026-03-16T10:00:00Z"): 1,
        ("bob", "2026-03-14T10:00:00Z"): 1,
    }
