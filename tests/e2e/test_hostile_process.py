"""Hostile input against `sidecar run` as a real process: startup refusals, the head deadline, and
no secret in any log line even at DEBUG.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.store.redis.embedded import free_port
from tests.e2e.conftest import Launcher, child_environment
from tests.helpers import Receiver, ServerFactory, answering, key_hash, listen, write_policy

API_KEY = "sk-live-acme-7f3a9c2e1b"
WRONG_KEY = "sk-live-wrong-55d0e8"
ADMIN_TOKEN = "adm-9b1e4f77c3"
WRONG_ADMIN_TOKEN = "adm-wrong-0a2b6d"
BILLING_SECRET = "whsec-5e8c1d9a"
BILLING_TOKEN = "bt-2c7f0e4d"
SECRETS = (API_KEY, WRONG_KEY, ADMIN_TOKEN, WRONG_ADMIN_TOKEN, BILLING_SECRET, BILLING_TOKEN)
CLI_TIMEOUT = 30.0


def policy_text(billing_url: str = "") -> str:
    billing = f'billing: {{url: "{billing_url}", format: json, interval: 1, grace: 0}}' if billing_url else ""
    return f"""
        version: 1
        meters: {{requests: {{aggregation: count}}}}
        features:
          - {{name: files, match: {{path: "/v1/{{name}}"}}}}
        plans:
          p: {{features: [files], limits: [{{meter: requests, limit: 1000, period: day}}]}}
        customers:
          acme: {{plan: p, api_keys: ["{key_hash(API_KEY)}"]}}
        {billing}
        """


async def run_to_exit(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`python -m sidecar ...` that is expected to exit by itself: (exit code, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**child_environment(), **(env or {})}, start_new_session=True,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode()


def run_args(policy: Path, tmp_path: Path, redis_url: str, *extra: str) -> list[str]:
    return [
        "run", "--listen", f"127.0.0.1:{free_port()}", "--upstream", "http://127.0.0.1:9",
        "--policies", str(policy), "--data-dir", str(tmp_path / "data"), "--redis", redis_url, *extra,
    ]  # fmt: skip


async def test_run_refuses_a_non_loopback_admin_port_without_a_token_exit_2(
    tmp_path: Path, redis_url: str
) -> None:
    policy = write_policy(tmp_path, policy_text())
    code, err = await run_to_exit(*run_args(policy, tmp_path, redis_url, "--admin", f"0.0.0.0:{free_port()}"))
    assert code == 2
    assert "is not a loopback address: set SIDECAR_ADMIN_TOKEN" in err


async def test_run_refuses_to_serve_without_aiohttps_c_parser_exit_2(tmp_path: Path, redis_url: str) -> None:
    policy = write_policy(tmp_path, policy_text())
    args = run_args(policy, tmp_path, redis_url, "--admin", f"127.0.0.1:{free_port()}")
    code, err = await run_to_exit(*args, env={"AIOHTTP_NO_EXTENSIONS": "1"})
    assert code == 2
    assert "aiohttp's C HTTP parser (llhttp) is not active because AIOHTTP_NO_EXTENSIONS is set" in err


async def test_sidecar_run_cuts_off_a_slowloris_at_the_header_timeout(
    launch: Launcher, tmp_path: Path, redis_url: str, session: aiohttp.ClientSession
) -> None:
    policy = write_policy(tmp_path, policy_text())
    sidecar = await launch(
        policy, "http://127.0.0.1:9", tmp_path / "data", "--redis", redis_url, "--header-timeout", "1"
    )
    await sidecar.wait_ready(session)
    host, port = sidecar.proxy.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    head = f"GET /v1/a HTTP/1.1\r\nHost: sidecar\r\nX-API-Key: {API_KEY}\r\n" + "X-Pad: p\r\n" * 50

    async def slowloris() -> None:
        for byte in head.encode():
            writer.write(bytes([byte]))
            await asyncio.sleep(0.01)

    sending = asyncio.create_task(slowloris())
    answer = await asyncio.wait_for(reader.read(), 10)
    elapsed = time.monotonic() - started
    sending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sending
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert 0.9 < elapsed < 3.0


# --- no secret in the logs ---------------------------------------------------------------------


@dataclass
class Process:
    process: asyncio.subprocess.Process
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")


@pytest.fixture
async def process(
    tmp_path: Path,
) -> AsyncIterator[Callable[[Sequence[str], dict[str, str]], Awaitable[Process]]]:
    """`sidecar run` with stdout and stderr both kept; stopped (with its group) at teardown."""
    started: list[Process] = []

    async def start(args: Sequence[str], env: dict[str, str]) -> Process:
        out, err = tmp_path / "stdout", tmp_path / "stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar", *args,
                stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                env={**child_environment(), **env}, start_new_session=True,
            )  # fmt: skip
        started.append(Process(child, out, err))
        return started[-1]

    yield start
    for each in started:
        if each.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(each.process.pid, signal.SIGKILL)
            await each.process.wait()


async def wait_ready(admin: str, session: aiohttp.ClientSession, child: Process) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and child.process.returncode is None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"http://{admin}/readyz", timeout=aiohttp.ClientTimeout(total=1)) as probe:
                if probe.status == 200:
                    return
        await asyncio.sleep(0.05)
    pytest.fail(f"sidecar not ready:\n{child.output()}")


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def raw_status(port: int, raw: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return int(answer.split(b" ", 2)[1])


async def test_no_api_key_admin_token_or_billing_secret_ever_reaches_the_logs_at_debug(
    tmp_path: Path,
    redis_url: str,
    aiohttp_server: ServerFactory,
    process: Callable[[Sequence[str], dict[str, str]], Awaitable[Process]],
    session: aiohttp.ClientSession,
) -> None:
    billing = await listen(aiohttp_server, Receiver(fail_first=10**9))  # down for good: 500
    upstream = await aiohttp_server(answering(ok), host="127.0.0.1")
    policy = write_policy(tmp_path, policy_text(billing.url))
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    args = [
        "run", "--listen", f"127.0.0.1:{port}", "--admin", admin,
        "--upstream", str(upstream.make_url("")).rstrip("/"), "--policies", str(policy),
        "--data-dir", str(tmp_path / "data"), "--redis", redis_url,
        "--log-level", "DEBUG", "--max-header-size", "4k",
    ]  # fmt: skip
    env = {
        "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN,
        "SIDECAR_BILLING_SECRET": BILLING_SECRET,
        "SIDECAR_BILLING_TOKEN": BILLING_TOKEN,
    }
    child = await process(args, env)
    await wait_ready(admin, session, child)
    proxy, statuses = f"http://127.0.0.1:{port}/v1/a", []

    async def status(method: str, url: str, headers: dict[str, str]) -> None:
        async with session.request(method, url, headers=headers) as response:
            await response.read()
            statuses.append(response.status)

    await status("GET", proxy, {"X-API-Key": API_KEY})
    await status("GET", proxy, {"Authorization": f"Bearer {API_KEY}"})
    await status("GET", proxy, {"X-API-Key": WRONG_KEY})
    await status("GET", proxy, {"Authorization": f"Bearer {WRONG_KEY}"})
    await status(
        "GET", f"http://{admin}/admin/customers/acme/usage", {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    await status(
        "GET", f"http://{admin}/admin/customers/acme/usage", {"Authorization": f"Bearer {WRONG_ADMIN_TOKEN}"}
    )
    await status("POST", f"http://{admin}/admin/reload", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    key_line = f"X-API-Key: {API_KEY}".encode()
    head = b"GET /v1/a HTTP/1.1\r\nHost: sidecar\r\n"
    statuses += [
        await raw_status(port, head + key_line + b"\x00\r\n\r\n"),  # the parser quotes the bad line
        await raw_status(port, head + key_line + b"\xff\r\n\r\n"),  # not UTF-8
        await raw_status(port, head + key_line + b"\r\n" + key_line + b"\r\n\r\n"),  # the key twice
        await raw_status(port, head + b"X-Long: " + API_KEY.encode() * 300 + b"\r\n\r\n"),  # too long
    ]
    await upstream.close()
    await status("GET", proxy, {"X-API-Key": API_KEY})  # upstream down
    deadline = time.monotonic() + 15
    while not billing.requests and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    child.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(child.process.wait(), 15) == 0
    assert statuses == [200, 200, 401, 401, 200, 401, 200, 400, 400, 400, 431, 502]
    assert billing.requests, "the billing push (which fails) never happened"
    assert billing.requests[0].headers["Authorization"] == f"Bearer {BILLING_TOKEN}"
    assert "Sidecar-Signature" in billing.requests[0].headers
    output = child.output()
    assert " DEBUG " in output and "billing push" in output  # the most verbose level, errors included
    leaked = [secret for secret in SECRETS if secret in output]
    assert leaked == [], output
    assert "Traceback" not in output
