"""Redis stopped or paused: every request is answered within the store timeout, by store_failure,
and the sidecar recovers by itself when Redis returns."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sidecar.http.app import build_proxy_app
from sidecar.http.components import COMPONENTS
from sidecar.store.redis.embedded import EmbeddedRedis
from tests.conftest import make_components
from tests.helpers import ACME, Client, ClientFactory, Upstream, loopback_client, quota_policy

STORE_TIMEOUT = 0.05
# The answer must come within the store timeout plus the sidecar's own work; generous for CI.
ANSWER_BUDGET = 0.25


@pytest.fixture
def make_client(
    aiohttp_client: ClientFactory, outage_redis: EmbeddedRedis, upstream: Upstream, tmp_path: Path
) -> Callable[[str], Awaitable[Client]]:
    """A proxy on the test's own redis-server, under a policy with the given store_failure."""

    async def make(store_failure: str) -> Client:
        policy = quota_policy(tmp_path, 100, "day", extra=f"store_failure: {store_failure}")
        components = make_components(policy, upstream.url, outage_redis.url, store_timeout=STORE_TIMEOUT)
        return await loopback_client(aiohttp_client, build_proxy_app(components), closing=components.store)

    return make


async def timed_get(client: Client) -> tuple[int, float, dict[str, str]]:
    started = time.perf_counter()
    response = await client.get("/v1/search", headers={"X-API-Key": ACME})
    await response.read()
    return response.status, time.perf_counter() - started, dict(response.headers)


async def test_stopped_store_fails_closed_fast_and_recovers_when_it_returns(
    make_client: Callable[[str], Awaitable[Client]], outage_redis: EmbeddedRedis
) -> None:
    client = await make_client("closed")
    assert (await timed_get(client))[0] == 200
    outage_redis.stop()
    answers = [await timed_get(client) for _ in range(5)]
    assert [status for status, _, _ in answers] == [503] * 5
    assert max(elapsed for _, elapsed, _ in answers) < ANSWER_BUDGET
    assert all(headers["Retry-After"] == "1" for _, _, headers in answers)
    outage_redis.start()  # same port
    assert await recovered_within(client, 2.0)
    errors = client.app[COMPONENTS].metrics.registry.get_sample_value(
        "sidecar_store_errors_total", {"operation": "check_and_meter"}
    )
    assert errors is not None and errors >= 5


async def recovered_within(client: Client, seconds: float) -> bool:
    """Service returns by itself: the circuit breaker lets a probe through after its cooldown."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (await timed_get(client))[0] == 200:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_the_circuit_breaker_answers_at_once_while_the_store_stays_paused(
    make_client: Callable[[str], Awaitable[Client]], outage_redis: EmbeddedRedis
) -> None:
    client = await make_client("closed")
    assert outage_redis.pid is not None
    os.kill(outage_redis.pid, signal.SIGSTOP)
    try:
        answers = [await timed_get(client) for _ in range(20)]
        assert client.app[COMPONENTS].store.circuit_open
    finally:
        os.kill(outage_redis.pid, signal.SIGCONT)
    assert [status for status, _, _ in answers] == [503] * 20
    waited = [elapsed for _, elapsed, _ in answers if elapsed >= STORE_TIMEOUT]
    assert len(waited) <= 6, "past the threshold, calls should not wait for the paused store"
    assert await recovered_within(client, 2.0)
    assert not client.app[COMPONENTS].store.circuit_open


async def test_paused_store_is_cut_off_at_the_store_timeout_and_recovers(
    make_client: Callable[[str], Awaitable[Client]], outage_redis: EmbeddedRedis
) -> None:
    client = await make_client("closed")
    assert (await timed_get(client))[0] == 200
    assert outage_redis.pid is not None
    os.kill(outage_redis.pid, signal.SIGSTOP)
    try:
        answers = [await timed_get(client) for _ in range(3)]
    finally:
        os.kill(outage_redis.pid, signal.SIGCONT)
    assert [status for status, _, _ in answers] == [503] * 3
    assert all(STORE_TIMEOUT <= elapsed < ANSWER_BUDGET for _, elapsed, _ in answers)
    assert await recovered_within(client, 2.0)


async def test_fail_open_admits_while_the_store_is_down(
    make_client: Callable[[str], Awaitable[Client]], outage_redis: EmbeddedRedis, upstream: Upstream
) -> None:
    client = await make_client("open")
    outage_redis.stop()
    status, elapsed, _ = await timed_get(client)
    assert (status, len(upstream.seen)) == (200, 1)
    assert elapsed < ANSWER_BUDGET
    admitted_unmetered = client.app[COMPONENTS].metrics.registry.get_sample_value(
        "sidecar_requests_total", {"decision": "admitted_unmetered", "feature": "search", "plan": "p"}
    )
    assert admitted_unmetered == 1
