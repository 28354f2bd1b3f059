"""`sidecar run` processes on a Redis Cluster (--redis-cluster) and behind Sentinel: two replicas
share the quota exactly, as on one server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import Launcher, get, store_args
from tests.helpers import Upstream, quota_policy
from tests.topologies import on_topologies

pytestmark = pytest.mark.slow


@on_topologies("cluster", "sentinel")
async def test_two_replicas_admit_exactly_the_quota(
    launch: Launcher, upstream: Upstream, session: aiohttp.ClientSession, tmp_path: Path, redis_url: str
) -> None:
    policy = quota_policy(tmp_path, 10)
    replicas = [
        await launch(policy, upstream.url, tmp_path / f"data-{n}", *store_args(redis_url)) for n in range(2)
    ]
    for replica in replicas:
        await replica.wait_ready(session)
    answers = await asyncio.gather(*(get(session, f"{replicas[n % 2].proxy}/v1/search") for n in range(40)))
    statuses = [status for status, _, _ in answers]
    assert (statuses.count(200), statuses.count(429)) == (10, 30), statuses
