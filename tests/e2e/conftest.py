"""The end-to-end tests' fixtures: `sidecar run` as a real process, and billing through replicas.

Each sidecar process runs in its own session (process group) so that, if a test fails half-way, the
teardown can kill the sidecar together with the redis-server it may have started, and nothing else.

Billing: `receiver` is a billing endpoint on loopback (tests/helpers.py, Receiver), `billing_policy`
pushes to it every second, and `replicas(n)` builds n sidecar apps on one store, each with its own
pusher; `send` spreads requests over them and `drain` cycles their pushers until billing has all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from sidecar.billing.pusher import Pusher
from sidecar.http.app import build_proxy_app
from sidecar.http.components import Components
from sidecar.store.redis.embedded import EmbeddedRedis, free_port
from tests.conftest import make_components
from tests.helpers import (
    ACME,
    BILLING_SECRET,
    TEST_STORE_TIMEOUT,
    Client,
    ClientFactory,
    Receiver,
    ServerFactory,
    Upstream,
    key_hash,
    listen,
    loopback_client,
    write_policy,
)

READY_TIMEOUT = 15.0
EXIT_TIMEOUT = 10.0
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=1)


@dataclass
class Sidecar:
    process: asyncio.subprocess.Process
    proxy: str  # base URL of the proxy port
    admin: str  # HOST:PORT of the admin port
    stderr_path: Path
    launched: float

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def wait_ready(self, session: aiohttp.ClientSession) -> float:
        """Seconds from launch until /readyz answers 200; fails the test if the process exits first."""
        code = await self.ready_or_exit(session)
        if code is not None:
            pytest.fail(f"sidecar exited {code} before ready:\n{self.stderr}")
        return time.monotonic() - self.launched

    async def ready_or_exit(self, session: aiohttp.ClientSession) -> int | None:
        """Polls /readyz until 200 (None) or until the process exits (its code), within READY_TIMEOUT."""
        deadline = self.launched + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                return self.process.returncode
            try:
                async with session.get(f"http://{self.admin}/readyz", timeout=PROBE_TIMEOUT) as probe:
                    if probe.status == 200:
                        return None
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
        pytest.fail(f"sidecar neither ready nor exited within {READY_TIMEOUT}s:\n{self.stderr}")

    async def terminate(self) -> tuple[int, float]:
        """SIGTERM to the sidecar alone; returns (exit code, seconds to exit)."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = await self.wait_exit()
        return code, time.monotonic() - sent


# launch(policies, upstream_url, data_dir, *extra_cli_args, env={...}) -> Sidecar
Launcher = Callable[..., Awaitable[Sidecar]]


def store_args(url: str) -> tuple[str, ...]:
    """`sidecar run`'s arguments for the store ``url`` names (a cluster's said with the flag, not
    the query, as an operator may), with the tests' store timeout: the default 50 ms is short for
    a loaded 2-core machine, and a 503 there is no test of exactness."""
    parts = urlsplit(url)
    timeout = ("--store-timeout", str(TEST_STORE_TIMEOUT))
    if "cluster" in parse_qs(parts.query):
        return "--redis", parts._replace(query="").geturl(), "--redis-cluster", *timeout
    return "--redis", url, *timeout


def child_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Launcher]:
    """Starts `sidecar run` subprocesses; extra CLI arguments (e.g. "--redis", url) follow the data
    dir, and `env` adds variables to the child's environment. Every one is stopped at teardown."""
    started: list[Sidecar] = []

    async def start(
        policies: Path,
        upstream_url: str,
        data_dir: Path,
        *extra_args: str,
        env: Mapping[str, str] | None = None,
    ) -> Sidecar:
        index = len(started)
        stderr_path = tmp_path / f"sidecar-{index}.stderr"
        listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        command = [
            sys.executable, "-m", "sidecar", "run",
            "--listen", listen, "--admin", admin, "--upstream", upstream_url,
            "--policies", str(policies), "--data-dir", str(data_dir),
            *extra_args,
        ]  # fmt: skip
        launched = time.monotonic()
        with stderr_path.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                cwd=tmp_path,
                env={**child_environment(), **(env or {})},
                start_new_session=True,
            )
        sidecar = Sidecar(process, f"http://{listen}", admin, stderr_path, launched)
        started.append(sidecar)
        return sidecar

    try:
        yield start
    finally:
        for sidecar in started:
            if sidecar.process.returncode is None:
                sidecar.process.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await sidecar.wait_exit()
            with contextlib.suppress(ProcessLookupError):  # the group: the sidecar and its redis-server
                os.killpg(sidecar.process.pid, signal.SIGKILL)
            if sidecar.process.returncode is None:
                await sidecar.process.wait()


@pytest.fixture
def outage_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of the test's own, to stop or pause (SIGSTOP); resumed before it is stopped."""
    server = EmbeddedRedis(tmp_path / "redis", persistent=False)
    server.start()
    yield server
    if server.pid is not None:
        os.kill(server.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client:
        yield client


async def get(session: aiohttp.ClientSession, url: str, key: str = ACME) -> tuple[int, str, str]:
    """(status, RateLimit header, body) of a GET with `key` as the API key."""
    async with session.get(url, headers={"X-API-Key": key}) as response:
        return response.status, response.headers.get("RateLimit", ""), await response.text()


def timing(name: str, seconds: float) -> None:
    """Startup and shutdown times, for the record (shown with -s or -rP)."""
    print(f"timing: {name}: {seconds:.2f}s")


def live_group_members(pgid: int) -> list[int]:
    """Pids of the process group that are still running (zombies excluded), from Linux /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


# --- billing through replicas ---------------------------------------------------------------------

BILLING_KEYS = {"acme": "acme-key-1", "bob": "bob-key-1"}
DRAIN_SECONDS = 20.0


@pytest.fixture
async def receiver(aiohttp_server: ServerFactory) -> Receiver:
    return await listen(aiohttp_server, Receiver())


@pytest.fixture
def billing_policy(tmp_path: Path, receiver: Receiver) -> Path:
    """acme and bob on a roomy month quota; summaries of 1 s windows, 7 to a push, to `receiver`."""
    customers = "\n".join(
        f'  {name}: {{plan: p, api_keys: ["{key_hash(key)}"]}}' for name, key in BILLING_KEYS.items()
    )
    return write_policy(
        tmp_path,
        f"""
version: 1
meters: {{requests: {{aggregation: count}}}}
features: [{{name: search, match: {{path: /v1/search}}}}]
plans: {{p: {{features: [search], limits: [{{meter: requests, limit: 100000, period: month}}]}}}}
customers:
{customers}
billing: {{url: "{receiver.url}", format: json, interval: 1, grace: 0, batch_size: 7}}
""",
    )


@dataclass
class Replica:
    client: Client
    components: Components
    pusher: Pusher


@pytest.fixture
async def replicas(
    aiohttp_client: ClientFactory, redis_url: str, upstream: Upstream, billing_policy: Path
) -> AsyncIterator[Callable[[int], Awaitable[list[Replica]]]]:
    """Builds replicas: sidecar apps on one store, each with a pusher signing with BILLING_SECRET."""
    sessions: list[aiohttp.ClientSession] = []

    async def replica() -> Replica:
        components = make_components(billing_policy, upstream.url, redis_url)
        client = await loopback_client(aiohttp_client, build_proxy_app(components), closing=components.store)
        session = aiohttp.ClientSession()
        sessions.append(session)
        pusher = Pusher(
            holder=components.holder,
            outbox=components.outbox,
            marks=components.marks,
            session=session,
            metrics=components.metrics,
            clock=components.store.time,
            directory=components.directory,
            secret=BILLING_SECRET,
            backoff_base=0.05,
        )
        return Replica(client, components, pusher)

    async def make(count: int) -> list[Replica]:
        return [await replica() for _ in range(count)]

    yield make
    for session in sessions:
        await session.close()


async def send(replicas: list[Replica], per_customer: int) -> dict[str, int]:
    """Requests spread over every replica; returns the admitted count per customer."""

    async def one(index: int, customer: str) -> tuple[str, int]:
        response = await replicas[index % len(replicas)].client.get(
            "/v1/search", headers={"X-API-Key": BILLING_KEYS[customer]}
        )
        await response.read()
        return customer, response.status

    calls = [one(i, customer) for customer in BILLING_KEYS for i in range(per_customer)]
    results = await asyncio.gather(*calls)
    return {c: sum(1 for name, status in results if name == c and status == 200) for c in BILLING_KEYS}


async def drain(replicas: list[Replica], receiver: Receiver, expected: dict[str, int]) -> None:
    """Cycle every replica's pusher at once until the receiver has every unit, or give up."""
    wanted = {(customer, "requests"): units for customer, units in expected.items()}
    deadline = asyncio.get_running_loop().time() + DRAIN_SECONDS
    while receiver.totals() != wanted and asyncio.get_running_loop().time() < deadline:
        await asyncio.gather(*(r.pusher.cycle() for r in replicas))
        await asyncio.sleep(0.1)
