"""Billing that is down, or too slow to answer: summaries wait in the outbox and are delivered
later with the same ids and values (README "Failure behaviour"; 5xx and 4xx are in test_billing).
The harness (receiver, billing_policy, replicas) is tests/e2e/conftest.py's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from sidecar.billing import sender
from sidecar.store.redis.embedded import free_port
from tests.e2e.conftest import Replica, drain, send
from tests.helpers import Receiver, ServerFactory, listen


@pytest.fixture
async def receiver() -> Receiver:
    """Not listening yet: `listen` starts it on the port the policy names."""
    return Receiver(url=f"http://127.0.0.1:{free_port()}/usage")


def pushes(replica: Replica, outcome: str) -> float:
    value = replica.components.metrics.registry.get_sample_value(
        "sidecar_billing_pushes_total", {"outcome": outcome}
    )
    return value or 0.0


async def test_billing_down_keeps_summaries_in_the_outbox_until_it_listens_then_delivers_each_once(
    replicas: Callable[[int], Awaitable[list[Replica]]],
    receiver: Receiver,
    aiohttp_server: ServerFactory,
) -> None:
    (replica,) = await replicas(1)
    admitted = await send([replica], 20)
    for _ in range(20):  # connection refused: every push is a retry
        await replica.pusher.cycle()
        if pushes(replica, "retry") >= 2:
            break
        await asyncio.sleep(0.1)
    assert pushes(replica, "retry") >= 2 and receiver.received == []

    await listen(aiohttp_server, receiver)
    await drain([replica], receiver, admitted)
    assert receiver.totals() == {("acme", "requests"): 20, ("bob", "requests"): 20}
    assert all(len(values) == 1 for values in receiver.values_by_id().values())


async def test_a_push_billing_answers_too_late_is_retried_with_the_same_ids_and_values(
    replicas: Callable[[int], Awaitable[list[Replica]]],
    receiver: Receiver,
    aiohttp_server: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sender, "PUSH_TIMEOUT", aiohttp.ClientTimeout(total=0.2))
    receiver.stall_first = 2  # stored, then answered after the push timeout
    await listen(aiohttp_server, receiver)
    (replica,) = await replicas(1)
    admitted = await send([replica], 20)
    await drain([replica], receiver, admitted)
    for _ in range(100):  # the receiver stored the late pushes; the sidecar resends until one is answered
        if pushes(replica, "delivered"):
            break
        await replica.pusher.cycle()
        await asyncio.sleep(0.05)
    assert pushes(replica, "retry") >= 1 and pushes(replica, "delivered") >= 1
    assert receiver.totals() == {("acme", "requests"): 20, ("bob", "requests"): 20}
    assert len(receiver.received) > len(receiver.values_by_id())  # some summaries came twice...
    assert all(len(values) == 1 for values in receiver.values_by_id().values())  # ...identical
