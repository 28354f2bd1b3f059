"""Usage to billing through real sidecar apps, real pushers, real Redis and a real billing receiver."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.billing.pusher import Pusher
from sidecar.billing.signing import verify
from sidecar.http.app import build_admin_app, build_proxy_app
from sidecar.http.components import Components
from tests.conftest import Upstream, key_hash, make_components, write_policy

KEYS = {"acme": "acme-key-1", "bob": "bob-key-1"}
SECRET = "whsec-test"
DRAIN_SECONDS = 20.0
Client = TestClient[web.Request, web.Application]


@dataclass
class Receiver:
    """A billing endpoint that records every summary it is sent and can fail on purpose."""

    url: str = ""
    fail_first: int = 0
    status_when_failing: int = 500
    posts: int = 0
    received: list[dict[str, object]] = field(default_factory=list)
    signatures_valid: list[bool] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts += 1
        if self.posts <= self.fail_first:
            return web.json_response({"error": "try later"}, status=self.status_when_failing)
        self.signatures_valid.append(verify(SECRET, request.headers.get("Sidecar-Signature", ""), body))
        self.received += json.loads(body)["summaries"]
        return web.json_response({"ok": True})

    def totals(self) -> dict[tuple[str, str], int]:
        """Units per (customer, meter) over unique summary ids, as a deduplicating receiver counts."""
        unique = {str(s["id"]): s for s in self.received}
        totals: dict[tuple[str, str], int] = {}
        for summary in unique.values():
            key = (str(summary["customer"]), str(summary["meter"]))
            totals[key] = totals.get(key, 0) + int(summary["value"])  # type: ignore[call-overload]
        return totals

    def values_by_id(self) -> dict[str, set[object]]:
        values: dict[str, set[object]] = {}
        for summary in self.received:
            values.setdefault(str(summary["id"]), set()).add(summary["value"])
        return values


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Receiver:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/usage", receiver.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    receiver.url = str(server.make_url("/usage"))
    return receiver


@pytest.fixture
def policy(tmp_path: Path, receiver: Receiver) -> Path:
    customers = "\n".join(
        f'  {name}: {{plan: p, api_keys: ["{key_hash(key)}"]}}' for name, key in KEYS.items()
    )
    return write_policy(
        tmp_path,
        f"""
version: 1
meters: {{requests: {{aggregation: count}}}}
features: [{{name: search, match: {{path: /v1/search}}}}]
plans: {{p: {{features: [search], limits: [{{meter: requests, limit: 100000, period: month}}]}}}}
customers:
{customers}
billing: {{url: "{receiver.url}", format: json, interval: 1, grace: 0, batch_size: 7}}
""",
    )


@dataclass
class Replica:
    client: Client
    components: Components
    pusher: Pusher


@pytest.fixture
async def replicas(
    aiohttp_client: Callable[..., Awaitable[Client]], redis_url: str, upstream: Upstream, policy: Path
) -> AsyncIterator[Callable[[int], Awaitable[list[Replica]]]]:
    sessions: list[aiohttp.ClientSession] = []

    async def make(count: int) -> list[Replica]:
        built = []
        for _ in range(count):
            components = make_components(policy, upstream.url, redis_url)
            app = build_proxy_app(components)
            app.on_cleanup.append(lambda _, c=components: c.store.close())  # type: ignore[misc]
            client = await aiohttp_client(app, server_kwargs={"host": "127.0.0.1"})
            session = aiohttp.ClientSession()
            sessions.append(session)
            pusher = Pusher(
                holder=components.holder,
                outbox=components.outbox,
                marks=components.marks,
                session=session,
                metrics=components.metrics,
                clock=components.store.time,
                directory=components.directory,
                secret=SECRET,
                backoff_base=0.05,
            )
            built.append(Replica(client, components, pusher))
        return built

    yield make
    for session in sessions:
        await session.close()


async def send(replicas: list[Replica], per_customer: int) -> dict[str, int]:
    """Requests spread over every replica; returns the admitted count per customer."""

    async def one(index: int, customer: str) -> tuple[str, int]:
        response = await replicas[index % len(replicas)].client.get(
            "/v1/search", headers={"X-API-Key": KEYS[customer]}
        )
        await response.read()
        return customer, response.status

    calls = [one(i, customer) for customer in KEYS for i in range(per_customer)]
    results = await asyncio.gather(*calls)
    return {c: sum(1 for name, status in results if name == c and status == 200) for c in KEYS}


async def drain(replicas: list[Replica], receiver: Receiver, expected: dict[str, int]) -> None:
    """Cycle every replica's pusher at once until the receiver has every unit, or give up."""
    wanted = {(customer, "requests"): units for customer, units in expected.items()}
    deadline = asyncio.get_running_loop().time() + DRAIN_SECONDS
    while receiver.totals() != wanted and asyncio.get_running_loop().time() < deadline:
        await asyncio.gather(*(r.pusher.cycle() for r in replicas))
        await asyncio.sleep(0.1)


async def test_every_admitted_unit_reaches_billing_once_per_customer_and_meter(
    replicas: Callable[[int], Awaitable[list[Replica]]], receiver: Receiver
) -> None:
    (replica,) = await replicas(1)
    admitted = await send([replica], 40)
    await drain([replica], receiver, admitted)
    assert receiver.totals() == {("acme", "requests"): 40, ("bob", "requests"): 40}
    assert all(len(values) == 1 for values in receiver.values_by_id().values())
    summary = receiver.received[0]
    assert set(summary) == {
        "id", "customer", "plan", "meter", "aggregation", "feature", "value", "window_start", "window_end",
    }  # fmt: skip
    assert str(summary["window_start"]).endswith("Z") and summary["aggregation"] == "count"


async def test_billing_failures_are_retried_until_delivered_with_the_same_ids_and_values(
    replicas: Callable[[int], Awaitable[list[Replica]]], receiver: Receiver
) -> None:
    receiver.fail_first = 3
    (replica,) = await replicas(1)
    admitted = await send([replica], 25)
    await drain([replica], receiver, admitted)
    assert receiver.totals() == {("acme", "requests"): 25, ("bob", "requests"): 25}
    assert all(len(values) == 1 for values in receiver.values_by_id().values())
    retries = replica.components.metrics.registry.get_sample_value(
        "sidecar_billing_pushes_total", {"outcome": "retry"}
    )
    assert retries is not None and retries >= 3


async def test_three_replicas_on_one_redis_deliver_each_unit_once(
    replicas: Callable[[int], Awaitable[list[Replica]]], receiver: Receiver
) -> None:
    three = await replicas(3)
    admitted = await send(three, 60)
    await drain(three, receiver, admitted)
    assert receiver.totals() == {("acme", "requests"): 60, ("bob", "requests"): 60}
    assert all(len(values) == 1 for values in receiver.values_by_id().values())


async def test_every_push_is_signed_with_the_billing_secret(
    replicas: Callable[[int], Awaitable[list[Replica]]], receiver: Receiver
) -> None:
    (replica,) = await replicas(1)
    admitted = await send([replica], 5)
    await drain([replica], receiver, admitted)
    assert receiver.signatures_valid and all(receiver.signatures_valid)


async def test_a_permanent_refusal_is_dead_lettered_and_a_redrive_delivers_it(
    replicas: Callable[[int], Awaitable[list[Replica]]],
    receiver: Receiver,
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    receiver.fail_first, receiver.status_when_failing = 1_000, 400
    (replica,) = await replicas(1)
    admitted = await send([replica], 3)
    admin = await aiohttp_client(build_admin_app(replica.components), server_kwargs={"host": "127.0.0.1"})
    letters: list[dict[str, object]] = []
    for _ in range(100):
        await replica.pusher.cycle()
        letters = (await (await admin.get("/admin/billing/dead-letters")).json())["dead_letters"]
        if sum(int(letter["summary"]["value"]) for letter in letters) == 6:  # type: ignore[index]
            break
        await asyncio.sleep(0.1)
    assert {str(letter["reason"])[:3] for letter in letters} == {"400"}
    receiver.fail_first = 0
    redriven = await (await admin.post("/admin/billing/dead-letters/redrive")).json()
    assert redriven["redriven"] == len(letters)
    await drain([replica], receiver, admitted)
    assert receiver.totals() == {("acme", "requests"): 3, ("bob", "requests"): 3}
