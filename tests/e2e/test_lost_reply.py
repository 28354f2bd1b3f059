"""A metering script that ran, whose reply never came back: the connection to Redis was lost in
between. Found by the soak (bench/soak.py): Redis stopped with SIGTERM runs the commands it read
in its last event-loop turn, writes them to its append-only file, and exits before sending their
replies. Taken as "the store is down" and nothing more, a request answered 503 under
`store_failure: closed` would stay metered, and one admitted under `open` would be metered twice
(by the script, and by the journal's merge).

Each metering call is named (connection token, sequence number) and, when it writes, leaves a
record in the store until a later call says its reply was read (lib.lua remember_call). The
journal keeps an unanswered call's name with the usage it admitted (open), or as a void (closed);
merging skips the usage of a call that ran, and undoes a voided call that ran. A TCP relay
(tests/relays.py) drops the connection when the reply to one script call arrives, which makes the
race deterministic.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.http.app import build_proxy_app
from sidecar.http.components import COMPONENTS, Components
from sidecar.ledger.journal import Journal
from tests.conftest import Upstream, key_hash, make_components, write_policy
from tests.relays import ReplyDropper, reply_dropper

KEY = "acme-key-1"
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def dropper(redis_url: str) -> AsyncIterator[ReplyDropper]:
    async with reply_dropper(redis_url) as relay:
        yield relay


@pytest.fixture
def make_client(
    aiohttp_client: Callable[..., Awaitable[Client]],
    dropper: ReplyDropper,
    upstream: Upstream,
    tmp_path: Path,
) -> Callable[[str], Awaitable[Client]]:
    async def make(store_failure: str) -> Client:
        policy = write_policy(
            tmp_path,
            f"""
            version: 1
            meters:
              requests: {{aggregation: count}}
              egress: {{aggregation: sum, source: response.bytes}}
            features:
              - {{name: search, match: {{path: /v1/search}}}}
              - {{name: export, match: {{path: /v1/export}}}}
            plans:
              p:
                features: [search, export]
                limits:
                  - {{meter: requests, feature: search, limit: 100, period: day}}
                  - {{meter: egress, feature: export, limit: 1000000, period: day}}
            customers: {{acme: {{plan: p, api_keys: ["{key_hash(KEY)}"]}}}}
            store_failure: {store_failure}
            """,
        )
        components = make_components(policy, upstream.url, dropper.url, store_timeout=1.0)
        journal = Journal(tmp_path / "journal")
        app = build_proxy_app(dataclasses.replace(components, journal=journal))
        app.on_cleanup.append(lambda _: components.store.close())
        return await aiohttp_client(app, server_kwargs={"host": "127.0.0.1"})

    return make


async def status_of_get(client: Client, path: str = "/v1/search") -> int:
    response = await client.get(path, headers={"X-API-Key": KEY})
    await response.read()
    return response.status


async def used_today(client: Client, meter: str = "requests") -> int:
    response = await client.get("/_sidecar/usage", headers={"X-API-Key": KEY})
    (limit,) = [row for row in (await response.json())["limits"] if row["meter"] == meter]
    return int(limit["used"])


async def merge_journal(components: Components) -> None:
    """Merge as the server's loop does, once a second, until nothing is pending: an entry naming a
    call is kept while that call's deadline (half the store timeout) has not passed at the store."""
    journal = components.journal
    assert journal is not None
    async with asyncio.timeout(10):
        while await journal.replay(components.store.replay) == 0 or journal.pending:
            await asyncio.sleep(0.2)


async def test_a_503_under_store_failure_closed_is_undone_once_the_journal_merges(
    make_client: Callable[[str], Awaitable[Client]], dropper: ReplyDropper
) -> None:
    client = await make_client("closed")
    assert await status_of_get(client) == 200
    dropper.armed = True
    assert await status_of_get(client) == 503
    assert dropper.dropped == 1
    assert await used_today(client) == 2, "the store ran the call whose reply was lost"
    await merge_journal(client.app[COMPONENTS])
    assert await used_today(client) == 1, "the client was refused, but the store metered the request"


async def test_a_request_admitted_through_the_journal_is_metered_once(
    make_client: Callable[[str], Awaitable[Client]], dropper: ReplyDropper
) -> None:
    client = await make_client("open")
    assert await status_of_get(client) == 200
    dropper.armed = True
    assert await status_of_get(client) == 200
    assert dropper.dropped == 1
    await merge_journal(client.app[COMPONENTS])
    assert await used_today(client) == 2, "two requests were answered 200"


async def test_a_503_for_a_reply_later_than_the_store_timeout_is_undone_too(
    make_client: Callable[[str], Awaitable[Client]], dropper: ReplyDropper
) -> None:
    client = await make_client("closed")
    assert await status_of_get(client) == 200
    dropper.delay = 2.0  # the reply is held past the 1 s store timeout, then its connection cut
    dropper.armed = True
    assert await status_of_get(client) == 503
    await merge_journal(client.app[COMPONENTS])
    assert await used_today(client) == 1


async def test_a_response_charge_whose_reply_is_lost_is_merged_once(
    make_client: Callable[[str], Awaitable[Client]], dropper: ReplyDropper
) -> None:
    client = await make_client("closed")
    assert await status_of_get(client, "/v1/export") == 200
    async with asyncio.timeout(5):
        while not (one := await used_today(client, "egress")):
            await asyncio.sleep(0.05)  # the charge lands just after the response is sent
    dropper.passed, dropper.armed = 1, True  # the admission's reply passes, the charge's is lost
    assert await status_of_get(client, "/v1/export") == 200
    async with asyncio.timeout(5):
        while not dropper.dropped:
            await asyncio.sleep(0.05)
    await merge_journal(client.app[COMPONENTS])
    assert await used_today(client, "egress") == 2 * one, "the charge that ran is not merged again"
