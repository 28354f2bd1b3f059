"""Usage records through `sidecar run` processes: a duplicate across a restart, and a store outage
answered per store_failure (open: journaled and merged once; closed: 503 per record)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.http.app import build_admin_app
from sidecar.http.events_api import BATCH
from sidecar.store.redis.embedded import EmbeddedRedis, free_port
from tests.conftest import make_components
from tests.e2e.conftest import Launcher, Sidecar
from tests.helpers import ClientFactory, Upstream, loopback_client, write_policy

STORE_TIMEOUT = "0.05"


def policy_file(tmp_path: Path, store_failure: str = "closed") -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters: {{gpu_seconds: {{aggregation: sum, source: event}}}}
        plans: {{p: {{limits: [{{meter: gpu_seconds, limit: 100000, period: day}}]}}}}
        customers: {{acme: {{plan: p}}}}
        store_failure: {store_failure}
        """,
    )


def event(record_id: str, value: int) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": record_id,
        "source": "workers",
        "type": "gpu_seconds",
        "subject": "acme",
        "data": {"value": value},
    }


async def post(session: aiohttp.ClientSession, admin: str, *events: dict[str, Any]) -> tuple[int, Any]:
    headers = {"Content-Type": BATCH}
    async with session.post(
        f"http://{admin}/admin/events", data=json.dumps(events), headers=headers
    ) as answer:
        return answer.status, await answer.json()


def outcomes(answer: dict[str, Any]) -> list[str]:
    return [r["result"] for r in answer["results"]]


async def used(session: aiohttp.ClientSession, sidecar: Sidecar) -> int:
    async with session.get(f"http://{sidecar.admin}/admin/customers/acme/usage") as response:
        return int((await response.json())["limits"][0]["used"])


async def test_a_record_sent_again_after_a_restart_is_a_duplicate(
    launch: Launcher, session: aiohttp.ClientSession, redis_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    policy = policy_file(tmp_path)
    first = await launch(policy, upstream.url, tmp_path / "one", "--redis", redis_url)
    await first.wait_ready(session)
    assert outcomes((await post(session, first.admin, event("job-7", 40)))[1]) == ["accepted"]
    code, _ = await first.terminate()
    assert code == 0

    second = await launch(policy, upstream.url, tmp_path / "two", "--redis", redis_url)
    await second.wait_ready(session)
    status, answer = await post(session, second.admin, event("job-7", 40), event("job-8", 2))
    assert (status, outcomes(answer)) == (200, ["duplicate", "accepted"])
    assert await used(session, second) == 42


async def test_records_during_an_outage_under_open_are_journaled_and_merged_once(
    launch: Launcher,
    session: aiohttp.ClientSession,
    outage_redis: EmbeddedRedis,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    args = ("--redis", outage_redis.url, "--store-timeout", STORE_TIMEOUT)
    sidecar = await launch(policy_file(tmp_path, "open"), upstream.url, tmp_path / "data", *args)
    await sidecar.wait_ready(session)
    assert outcomes((await post(session, sidecar.admin, event("before", 1)))[1]) == ["accepted"]

    assert outage_redis.pid is not None
    os.kill(outage_redis.pid, signal.SIGSTOP)
    started = time.perf_counter()
    status, answer = await post(session, sidecar.admin, event("during", 10), event("before", 1))
    took = time.perf_counter() - started
    assert (status, outcomes(answer)) == (200, ["accepted", "accepted"])
    assert all(r.get("journaled") for r in answer["results"])
    status, answer = await post(session, sidecar.admin, event("during", 10))  # sent again: kept again
    assert (status, outcomes(answer)) == (200, ["accepted"])
    assert took < 1.0, f"a batch took {took:.3f}s during the outage"

    os.kill(outage_redis.pid, signal.SIGCONT)
    await sidecar.wait_ready(session)
    deadline = time.monotonic() + 10
    while (total := await used(session, sidecar)) < 11 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert total == 11  # "before" once, "during" once, however often each was kept
    await asyncio.sleep(1.5)  # another merge cycle finds nothing more
    assert await used(session, sidecar) == 11
    assert outcomes((await post(session, sidecar.admin, event("during", 10)))[1]) == ["duplicate"]


async def test_records_during_an_outage_under_closed_are_503_each(
    aiohttp_client: ClientFactory, tmp_path: Path, upstream: Upstream
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}"  # nothing listens: every store call fails
    components = make_components(policy_file(tmp_path), upstream.url, dead, store_timeout=0.05)
    admin = await loopback_client(aiohttp_client, build_admin_app(components), closing=components.store)
    body = json.dumps([event("x", 1), event("y", 2)])
    started = time.perf_counter()
    response = await admin.post("/admin/events", data=body, headers={"Content-Type": BATCH})
    took = time.perf_counter() - started
    answer = await response.json()
    assert (response.status, response.headers["Retry-After"]) == (503, "1")
    assert outcomes(answer) == ["unavailable", "unavailable"]
    assert all(r["status"] == 503 for r in answer["results"])
    assert took < 1.0
