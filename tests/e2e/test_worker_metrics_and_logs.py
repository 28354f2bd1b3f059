"""Operations under `sidecar run`: /metrics counts every worker (--workers N), and
`--log-format json` writes one JSON object a line with no key material in it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import ACME, Launcher, store_args
from tests.e2e.test_workers import QUOTA, children, one_request_on_a_new_connection
from tests.helpers import Upstream, quota_policy

pytestmark = pytest.mark.slow
SENT = 40


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return quota_policy(tmp_path, QUOTA)


async def scrape(session: aiohttp.ClientSession, admin: str) -> dict[str, float]:
    """Every sample of /metrics, summed over its labels: name → total."""
    async with session.get(f"http://{admin}/metrics") as response:
        text = await response.text()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


async def test_metrics_of_two_workers_count_every_request(
    launch: Launcher,
    session: aiohttp.ClientSession,
    upstream: Upstream,
    policy: Path,
    redis_url: str,
    tmp_path: Path,
) -> None:
    sidecar = await launch(policy, upstream.url, tmp_path / "data", *store_args(redis_url), "--workers", "2")
    await sidecar.wait_ready(session)
    assert len(children(sidecar.process.pid)) == 2
    statuses = await asyncio.gather(*(one_request_on_a_new_connection(sidecar.proxy) for _ in range(SENT)))
    assert statuses.count(200) == QUOTA, statuses
    totals = await scrape(session, sidecar.admin)
    assert totals["sidecar_requests_total"] == SENT, "worker 0's /metrics counts both workers"
    assert totals["sidecar_overhead_seconds_count"] == QUOTA, "one observation per forwarded request"
    await asyncio.sleep(1.5)  # the workers copy their store traffic into the shared counters each second
    totals = await scrape(session, sidecar.admin)
    assert totals["sidecar_store_script_calls_total"] >= SENT
    code, _ = await sidecar.terminate()
    assert code == 0, sidecar.stderr


async def test_json_logs_are_one_object_a_line_without_keys(
    launch: Launcher, session: aiohttp.ClientSession, upstream: Upstream, policy: Path, tmp_path: Path
) -> None:
    sidecar = await launch(
        policy, upstream.url, tmp_path / "data", "--log-format", "json", "--log-level", "DEBUG"
    )
    await sidecar.wait_ready(session)
    async with session.get(f"{sidecar.proxy}/v1/search", headers={"X-API-Key": ACME}) as response:
        assert response.status == 200
    async with session.get(f"{sidecar.proxy}/v1/search", headers={"X-API-Key": "not-a-key"}) as response:
        assert response.status == 401
    code, _ = await sidecar.terminate()
    assert code == 0, sidecar.stderr
    lines = [line for line in sidecar.stderr.splitlines() if line.strip()]
    assert lines, "the sidecar logged something"
    records = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    assert any("serving" in record["message"] for record in records)
    assert ACME not in sidecar.stderr and "not-a-key" not in sidecar.stderr


async def test_a_bad_log_format_is_refused_by_name(
    launch: Launcher, session: aiohttp.ClientSession, upstream: Upstream, policy: Path, tmp_path: Path
) -> None:
    sidecar = await launch(policy, upstream.url, tmp_path / "data", "--log-format", "yaml")
    assert await sidecar.wait_exit() == 2
    assert "--log-format='yaml': expected text or json" in sidecar.stderr
