"""`sidecar run` processes on a Redis Cluster (--redis-cluster) and behind Sentinel: two replicas
share the quota exactly, as on one server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.e2e.conftest import Launcher, get
from tests.e2e.test_run import policy, upstream, upstream_url
from tests.topologies import Cluster, SentinelGroup, node_client

pytestmark = pytest.mark.slow
__all__ = ["policy", "upstream"]  # fixtures of test_run.py: a month quota of 10, and /v1/search


async def two_replicas_share_the_quota(
    launch: Launcher,
    policy: Path,
    upstream: TestServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    *args: str,
) -> None:
    replicas = [await launch(policy, upstream_url(upstream), tmp_path / f"data-{n}", *args) for n in range(2)]
    for replica in replicas:
        await replica.wait_ready(session)
    answers = await asyncio.gather(*(get(session, f"{replicas[n % 2].proxy}/v1/search") for n in range(40)))
    statuses = [status for status, _, _ in answers]
    assert (statuses.count(200), statuses.count(429)) == (10, 30)


async def test_two_replicas_on_a_redis_cluster_admit_exactly_the_quota(
    launch: Launcher,
    policy: Path,
    upstream: TestServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    cluster: Cluster,
) -> None:
    cluster.flush()
    nodes = urlsplit(cluster.url)._replace(query="").geturl()  # the flag, not the query, says cluster
    await two_replicas_share_the_quota(
        launch, policy, upstream, session, tmp_path, "--redis", nodes, "--redis-cluster"
    )


async def test_two_replicas_behind_sentinel_admit_exactly_the_quota(
    launch: Launcher,
    policy: Path,
    upstream: TestServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    sentinel_group: SentinelGroup,
) -> None:
    with node_client(sentinel_group.current_master()) as master:
        master.flushall()
    await two_replicas_share_the_quota(
        launch, policy, upstream, session, tmp_path, "--redis", sentinel_group.url
    )
