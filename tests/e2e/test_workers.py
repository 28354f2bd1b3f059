"""`sidecar run --workers N`: several processes on one proxy port (SO_REUSEPORT), one store,
exact between them, and SIGTERM stops every one of them."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from sidecar.store.redis.pipeline import CLIENT_NAME
from tests.e2e.conftest import ACME, Launcher, live_group_members, store_args, timing
from tests.helpers import TEST_STORE_TIMEOUT, Upstream, quota_policy

pytestmark = pytest.mark.slow
QUOTA = 30


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return quota_policy(tmp_path, QUOTA)


async def one_request_on_a_new_connection(url: str) -> int:
    """A new TCP connection each time, so the kernel picks a worker each time."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as fresh,
        fresh.get(f"{url}/v1/search", headers={"X-API-Key": ACME}) as response,
    ):
        await response.read()
        return response.status


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def test_two_workers_both_answer_exactly_and_sigterm_stops_all(
    launch: Launcher,
    session: aiohttp.ClientSession,
    upstream: Upstream,
    policy: Path,
    redis_url: str,
    tmp_path: Path,
) -> None:
    sidecar = await launch(policy, upstream.url, tmp_path / "data", *store_args(redis_url), "--workers", "2")
    timing("ready with 2 workers", await sidecar.wait_ready(session))
    workers = children(sidecar.process.pid)
    assert len(workers) == 2
    statuses = await asyncio.gather(*(one_request_on_a_new_connection(sidecar.proxy) for _ in range(50)))
    assert sorted(statuses) == [200] * QUOTA + [429] * (50 - QUOTA), "exact across the two workers"
    client = aioredis.Redis.from_url(redis_url)
    try:
        batchers = [c for c in await client.client_list() if c["name"] == CLIENT_NAME]
    finally:
        await client.aclose()
    assert len(batchers) == 2, "one store connection per worker"
    assert all(c["cmd"] == "evalsha" for c in batchers), "both workers admitted requests"
    code, seconds = await sidecar.terminate()
    timing("SIGTERM to exit, 2 workers", seconds)
    assert code == 0, sidecar.stderr
    assert live_group_members(sidecar.process.pid) == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


async def test_workers_share_the_embedded_store_and_stop_it_last(
    launch: Launcher, session: aiohttp.ClientSession, upstream: Upstream, policy: Path, tmp_path: Path
) -> None:
    timeout = ("--store-timeout", str(TEST_STORE_TIMEOUT))  # the embedded store, with the tests' timeout
    sidecar = await launch(policy, upstream.url, tmp_path / "data", *timeout, env={"SIDECAR_WORKERS": "3"})
    await sidecar.wait_ready(session)
    assert len(children(sidecar.process.pid)) == 4, "three workers and the redis-server"
    statuses = await asyncio.gather(*(one_request_on_a_new_connection(sidecar.proxy) for _ in range(40)))
    assert statuses.count(200) == QUOTA, statuses
    code, _ = await sidecar.terminate()
    assert code == 0, sidecar.stderr
    assert live_group_members(sidecar.process.pid) == []


async def test_a_worker_that_dies_stops_the_sidecar_with_exit_1(
    launch: Launcher,
    session: aiohttp.ClientSession,
    upstream: Upstream,
    policy: Path,
    redis_url: str,
    tmp_path: Path,
) -> None:
    sidecar = await launch(policy, upstream.url, tmp_path / "data", "--redis", redis_url, "--workers", "2")
    await sidecar.wait_ready(session)
    first, second = children(sidecar.process.pid)
    os.kill(second, signal.SIGKILL)
    assert await sidecar.wait_exit() == 1
    assert "exited with -9" in sidecar.stderr
    assert not Path(f"/proc/{first}").exists() or "Z" in Path(f"/proc/{first}/stat").read_text().split()[2]
