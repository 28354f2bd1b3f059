"""Launching `sidecar run` as a real process, shared by the end-to-end tests that need one.

Each sidecar runs in its own session (process group) so that, if a test fails half-way, the
teardown can kill the sidecar together with the redis-server it may have started, and nothing else.
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

import aiohttp
import pytest

from sidecar.store.redis.embedded import EmbeddedRedis, free_port

ACME = "acme-key-1"
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
