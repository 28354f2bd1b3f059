"""Usage to billing through real sidecar apps, real pushers, real Redis and a real billing receiver
(the harness: tests/e2e/conftest.py, receiver, billing_policy, replicas). The exactness tests run
on one server and on a Redis Cluster, whose keys of one customer share a slot."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sidecar.http.app import build_admin_app
from tests.e2e.conftest import Replica, drain, send
from tests.helpers import BILLING_SECRET, ClientFactory, Receiver, loopback_client
from tests.topologies import on_topologies


@on_topologies("single", "cluster")
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


@on_topologies("single", "cluster")
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


@on_topologies("single", "cluster")
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
    assert receiver.signed_with(BILLING_SECRET)


@on_topologies("single", "cluster")
async def test_a_permanent_refusal_is_dead_lettered_and_a_redrive_delivers_it(
    replicas: Callable[[int], Awaitable[list[Replica]]],
    receiver: Receiver,
    aiohttp_client: ClientFactory,
) -> None:
    receiver.fail_first, receiver.status_when_failing = 1_000, 400
    (replica,) = await replicas(1)
    admitted = await send([replica], 3)
    admin = await loopback_client(aiohttp_client, build_admin_app(replica.components))
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
