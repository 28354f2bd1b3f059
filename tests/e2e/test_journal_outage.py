"""store_failure: open through a real outage: usage admitted while Redis is paused is kept in the
local journal, survives a restart of the sidecar, and is merged once when Redis returns."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from sidecar.store.redis.embedded import EmbeddedRedis
from tests.e2e.conftest import ACME, PROBE_TIMEOUT, READY_TIMEOUT, Launcher, Sidecar, get
from tests.helpers import Upstream, key_hash, used_today, write_policy

STORE_TIMEOUT = "0.05"


def open_policy(tmp_path: Path) -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters: {{requests: {{aggregation: count}}}}
        features: [{{name: search, match: {{path: /v1/search}}}}]
        plans: {{p: {{features: [search], limits: [{{meter: requests, limit: 100, period: day}}]}}}}
        customers: {{acme: {{plan: p, api_keys: ["{key_hash(ACME)}"]}}}}
        store_failure: open
        """,
    )


async def wait_healthy(session: aiohttp.ClientSession, sidecar: Sidecar) -> None:
    """/healthz, not /readyz: the store is down on purpose."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            async with session.get(f"http://{sidecar.admin}/healthz", timeout=PROBE_TIMEOUT) as probe:
                if probe.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            await asyncio.sleep(0.05)
    pytest.fail(f"sidecar not healthy:\n{sidecar.stderr}")


async def test_usage_admitted_during_an_outage_survives_a_restart_and_is_merged_once(
    launch: Launcher,
    session: aiohttp.ClientSession,
    outage_redis: EmbeddedRedis,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    policy, data = open_policy(tmp_path), tmp_path / "data"
    args = ("--redis", outage_redis.url, "--store-timeout", STORE_TIMEOUT)
    first = await launch(policy, upstream.url, data, *args)
    await first.wait_ready(session)
    assert [(await get(session, f"{first.proxy}/v1/search"))[0] for _ in range(3)] == [200] * 3

    assert outage_redis.pid is not None
    os.kill(outage_redis.pid, signal.SIGSTOP)
    worst = 0.0
    for _ in range(20):
        started = time.perf_counter()
        assert (await get(session, f"{first.proxy}/v1/search"))[0] == 200
        worst = max(worst, time.perf_counter() - started)
    assert worst < 0.5, f"a request took {worst:.3f}s during the outage"
    code, _ = await first.terminate()  # a restart during the outage
    assert code == 0

    second = await launch(policy, upstream.url, data, *args)
    await wait_healthy(session, second)
    os.kill(outage_redis.pid, signal.SIGCONT)
    await second.wait_ready(session)
    deadline = time.monotonic() + 10
    while (used := await used_today(session, second.admin)) < 23 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert used == 23
    await asyncio.sleep(1.5)  # another merge cycle finds nothing left to merge
    assert await used_today(session, second.admin) == 23
    assert len(upstream.seen) == 23
