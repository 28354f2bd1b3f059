"""`sidecar run` as a real process (SPEC §2): embedded redis-server, restart durability, SIGTERM drain,
refusal of a bad policy, one sidecar per data directory.

The launching machinery (`launch`, `Sidecar`, `session`, ...) lives in tests/e2e/conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.e2e.conftest import (
    ACME,
    Launcher,
    Sidecar,
    child_environment,
    get,
    live_group_members,
    timing,
)
from tests.helpers import ServerFactory, key_hash, serve, upstream_app, write_policy

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "policies"
SLOW_UPSTREAM_SECONDS = 1.5


@pytest.fixture
def entered() -> asyncio.Event:
    """Set when a request reaches the upstream's GET /v1/slow."""
    return asyncio.Event()


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory, entered: asyncio.Event) -> str:
    """The recording upstream, whose GET /v1/slow answers after SLOW_UPSTREAM_SECONDS."""

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await asyncio.sleep(SLOW_UPSTREAM_SECONDS)
        return web.json_response({"slow": True})

    return await serve(aiohttp_server, upstream_app(lambda app: app.router.add_get("/v1/slow", slow)))


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters:
          requests: {{aggregation: count}}
        features:
          - {{name: search, match: {{method: GET, path: /v1/search}}}}
          - {{name: slow, match: {{method: GET, path: /v1/slow}}}}
        plans:
          pro:
            features: [search, slow]
            limits:
              - {{meter: requests, limit: 10, period: month}}
        customers:
          acme: {{plan: pro, api_keys: ["{key_hash(ACME)}"]}}
        """,
    )


async def sidecar_cli(*args: str) -> tuple[int, str, str]:
    """A `python -m sidecar ...` subprocess: (exit code, stdout, stderr), bounded in time."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=child_environment(),
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def cli_usage(customer: str, admin: str) -> dict[str, object]:
    code, out, err = await sidecar_cli("usage", customer, "--admin", admin, "--json")
    assert code == 0, err
    document: dict[str, object] = json.loads(out)
    return document


# -- (a) embedded store, restart durability -----------------------------------------------------


async def test_embedded_store_serves_and_a_monthly_counter_survives_a_restart(
    launch: Launcher, policy: Path, upstream: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = await launch(policy, upstream, data_dir)
    timing("startup, cold, embedded redis", await first.wait_ready(session))
    assert [(await get(session, f"{first.proxy}/v1/search"))[0] for _ in range(2)] == [200, 200]
    assert (data_dir / "redis").is_dir()

    code, seconds = await first.terminate()
    timing("exit after SIGTERM, idle", seconds)
    assert code == 0, first.stderr
    assert live_group_members(first.process.pid) == [], "the embedded redis-server outlived the sidecar"

    second = await launch(policy, upstream, data_dir)
    timing("startup, restart on the same data dir", await second.wait_ready(session))
    document = await cli_usage("acme", second.admin)
    assert (document["customer"], document["plan"]) == ("acme", "pro")
    assert document["limits"] == [
        {
            "meter": "requests",
            "period": "month",
            "feature": None,
            "limit": 10,
            "used": 2,
            "remaining": 8,
            "reset": document["limits"][0]["reset"],  # type: ignore[index]
        }
    ]
    status, ratelimit, _ = await get(session, f"{second.proxy}/v1/search")
    assert status == 200
    assert ratelimit.startswith('"requests-month";r=7;t=')


# -- (b) SIGTERM drains in-flight requests ----------------------------------------------------


async def test_sigterm_lets_an_in_flight_request_finish_then_exits_0(
    launch: Launcher,
    policy: Path,
    upstream: str,
    entered: asyncio.Event,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sidecar = await launch(policy, upstream, tmp_path / "data")
    await sidecar.wait_ready(session)
    in_flight = asyncio.create_task(get(session, f"{sidecar.proxy}/v1/slow"))
    try:
        await asyncio.wait_for(entered.wait(), 5)
        sent = time.monotonic()
        sidecar.process.send_signal(signal.SIGTERM)
        status, _, body = await asyncio.wait_for(in_flight, 10)
        code = await sidecar.wait_exit()
    finally:
        in_flight.cancel()
        await asyncio.gather(in_flight, return_exceptions=True)
    timing("exit after SIGTERM, draining a 1.5 s request", time.monotonic() - sent)
    assert (status, json.loads(body)) == (200, {"slow": True})
    assert code == 0, sidecar.stderr
    assert live_group_members(sidecar.process.pid) == [], "the embedded redis-server outlived the sidecar"


# -- (c) a bad policy is refused at startup -------------------------------------------------------


async def test_bad_policy_makes_run_exit_1_with_the_located_error(
    launch: Launcher, upstream: str, tmp_path: Path
) -> None:
    bad = FIXTURES / "bad_misspelled_limit_key.yaml"
    data_dir = tmp_path / "data"
    sidecar = await launch(bad, upstream, data_dir)
    code = await sidecar.wait_exit(30)
    assert code == 1
    assert f"{bad}:13:27: plans.free.limits[0].limt: unknown key 'limt'" in sidecar.stderr
    assert not (data_dir / "redis").exists()


# -- (d) one sidecar per data directory ----------------------------------------------------------


async def test_second_run_on_the_same_data_dir_fails_clearly_and_the_first_keeps_serving(
    launch: Launcher, policy: Path, upstream: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = await launch(policy, upstream, data_dir)
    await first.wait_ready(session)
    second = await launch(policy, upstream, data_dir)
    code = await second.wait_exit(30)
    assert code == 2
    assert str(data_dir) in second.stderr
    assert "in use" in second.stderr
    assert (await get(session, f"{first.proxy}/v1/search"))[0] == 200
    assert (await first.terminate())[0] == 0


async def test_restart_after_a_crash_never_runs_two_redis_servers_on_one_data_dir(
    launch: Launcher, policy: Path, upstream: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A crashed (SIGKILLed, OOM-killed) sidecar leaves its redis-server behind. The next sidecar on
    that data dir must either take the data dir back (the old server gone, nothing lost) or refuse
    clearly; it must never start a second redis-server on the same append-only files."""
    data_dir = tmp_path / "data"
    crashed = await launch(policy, upstream, data_dir)
    await crashed.wait_ready(session)
    assert [(await get(session, f"{crashed.proxy}/v1/search"))[0] for _ in range(2)] == [200, 200]
    os.kill(crashed.process.pid, signal.SIGKILL)
    await crashed.wait_exit()

    restarted = await launch(policy, upstream, data_dir)
    code = await restarted.ready_or_exit(session)
    if code is not None:
        assert code == 2, restarted.stderr
        assert str(data_dir) in restarted.stderr
        return
    leftover = live_group_members(crashed.process.pid)
    assert leftover == [], (
        f"redis-server {leftover} of the crashed sidecar still runs on {data_dir / 'redis'}"
    )
    document = await cli_usage("acme", restarted.admin)
    assert document["limits"][0]["used"] == 2  # type: ignore[index]


async def test_sigint_stops_run_like_sigterm(
    launch: Launcher, policy: Path, upstream: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sidecar = await launch(policy, upstream, tmp_path / "data")
    await sidecar.wait_ready(session)
    sidecar.process.send_signal(signal.SIGINT)
    assert await sidecar.wait_exit() == 0, sidecar.stderr
    assert live_group_members(sidecar.process.pid) == [], "the embedded redis-server outlived the sidecar"


# -- `sidecar usage` against a running sidecar ----------------------------------------------------


async def test_usage_command_prints_the_table(
    launch: Launcher, policy: Path, upstream: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sidecar = await launch(policy, upstream, tmp_path / "data")
    await sidecar.wait_ready(session)
    assert (await get(session, f"{sidecar.proxy}/v1/search"))[0] == 200
    code, out, err = await sidecar_cli("usage", "acme", "--admin", sidecar.admin)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["customer", "acme", "plan", "pro"]
    assert lines[1].split() == ["meter", "period", "feature", "limit", "used", "remaining", "reset"]
    assert lines[2].split()[:6] == ["requests", "month", "-", "10", "1", "9"]


async def test_usage_command_for_an_unknown_customer_exits_1_with_the_404(
    launch: Launcher, policy: Path, upstream: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sidecar = await launch(policy, upstream, tmp_path / "data")
    await sidecar.wait_ready(session)
    code, out, err = await sidecar_cli("usage", "mallory", "--admin", sidecar.admin)
    assert (code, out) == (1, "")
    assert "404" in err
    assert "mallory" in err


# -- SIGHUP reloads the policy -------------------------------------------------------------------


async def test_sighup_puts_an_edited_policy_in_force_and_a_broken_one_is_refused(
    launch: Launcher, policy: Path, upstream: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sidecar = await launch(policy, upstream, tmp_path / "data")
    await sidecar.wait_ready(session)
    assert "q=10;" in await policy_header(session, sidecar)
    policy.write_text(policy.read_text().replace("limit: 10,", "limit: 20,"))
    sidecar.process.send_signal(signal.SIGHUP)
    assert await eventually(lambda: policy_header(session, sidecar), "q=20;")
    policy.write_text(policy.read_text().replace("limit: 20,", "limt: 30,"))
    sidecar.process.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    assert "q=20;" in await policy_header(session, sidecar)
    assert sidecar.process.returncode is None


async def policy_header(session: aiohttp.ClientSession, sidecar: Sidecar) -> str:
    async with session.get(f"{sidecar.proxy}/v1/search", headers={"X-API-Key": ACME}) as response:
        return response.headers.get("RateLimit-Policy", "")


async def eventually(probe: Callable[[], Awaitable[str]], expected: str, seconds: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        if expected in await probe():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_an_edited_policy_file_is_put_in_force_without_a_signal(
    launch: Launcher, policy: Path, upstream: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sidecar = await launch(policy, upstream, tmp_path / "data")
    await sidecar.wait_ready(session)
    assert "q=10;" in await policy_header(session, sidecar)
    policy.write_text(policy.read_text().replace("limit: 10,", "limit: 40,"))
    assert await eventually(lambda: policy_header(session, sidecar), "q=40;")
    policy.write_text(policy.read_text().replace("limit: 40,", "limit: -1,"))
    await asyncio.sleep(2.5)
    assert "q=40;" in await policy_header(session, sidecar)
