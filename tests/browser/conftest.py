"""A real sidecar for a real browser: `sidecar run` as a process on the tests' Redis, with an
admin token, an upstream, a billing receiver and a notification receiver on loopback (threads, so
that the tests can drive the browser synchronously), and headless Chromium through selenium.

Without Chromium, its driver or selenium the browser tests skip, naming what is missing; with
SIDECAR_REQUIRE_BROWSER=1 (set by .ci/run after .ci/browser-tools.sh) they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sidecar.store.redis.embedded import free_port
from tests.helpers import key_hash, write_policy

REPO = Path(__file__).resolve().parents[2]
TOKEN = "ui-test-token-3f9c"
ACME_KEY = "acme-ui-key"
READY_SECONDS = 15.0
# A receiver's refusal: shown by the page as text, never run (tests/browser/test_ui.py).
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


def browser_paths() -> tuple[str, str] | str:
    """(chromium, chromedriver), or why the browser tests cannot run."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install '.[test]')"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        return "no chromium or chromedriver on PATH (bash .ci/browser-tools.sh installs Debian's)"
    return chromium, driver


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    found = browser_paths()
    if isinstance(found, str):
        if os.environ.get("SIDECAR_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SIDECAR_REQUIRE_BROWSER=1 but {found}")
        pytest.skip(found)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


@dataclass
class Receiver:
    """A loopback endpoint recording the JSON bodies it is sent; while ``refusing`` it answers
    422 with HOSTILE as its body (a permanent refusal: dead letters)."""

    refusing: bool = False
    bodies: list[Any] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/in"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, answer = (422, HOSTILE.encode()) if receiver.refusing else (200, b'{"ok": true}')
                if status == 200:
                    receiver.bodies.append(json.loads(body))
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if status != 200 else "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def do_GET(self) -> None:  # the upstream's answer
                answer = b'{"hello": "world"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class Sidecar:
    proxy: str
    admin: str
    billing: Receiver
    hooks: Receiver
    process: subprocess.Popen[bytes]
    stderr: Path

    def call(
        self, method: str, path: str, body: object = None, *, token: str | None = TOKEN
    ) -> tuple[int, Any]:
        """An admin API call, as an operator's script would make it."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.admin}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def search(self, key: str = ACME_KEY) -> int:
        request = urllib.request.Request(f"{self.proxy}/v1/search", headers={"X-API-Key": key})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)


def ui_policy(directory: Path, billing: Receiver, hooks: Receiver) -> Path:
    return write_policy(
        directory,
        f"""
        version: 1
        meters:
          requests: {{aggregation: count}}
        features: [{{name: search, match: {{path: /v1/search}}}}]
        plans:
          p:
            features: [search]
            limits:
              - {{meter: requests, limit: 10, period: month}}
              - {{meter: requests, limit: 50, period: minute}}
          gold: {{features: [search], prepaid: [requests]}}
        customers:
          acme: {{plan: p, api_keys: ["{key_hash(ACME_KEY)}"]}}
        billing: {{url: "{billing.url}", format: json, interval: 1, grace: 0}}
        notifications: {{url: "{hooks.url}", thresholds: [80, 100]}}
        """,
    )


def wait_ready(admin: str, process: subprocess.Popen[bytes], stderr: Path) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"sidecar exited {process.returncode}:\n{stderr.read_text()}")
        try:
            with urllib.request.urlopen(f"{admin}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    pytest.fail(f"sidecar not ready in {READY_SECONDS}s:\n{stderr.read_text()}")


@pytest.fixture
def sidecar(tmp_path: Path, redis_url: str) -> Iterator[Sidecar]:
    """`sidecar run` with SIDECAR_ADMIN_TOKEN, on the test's Redis, its receivers on loopback."""
    upstream, billing, hooks = Receiver().start(), Receiver(refusing=True).start(), Receiver().start()
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    command = [
        sys.executable, "-m", "sidecar", "run", "--listen", listen, "--admin", admin,
        "--upstream", f"http://127.0.0.1:{upstream.server.server_address[1]}" if upstream.server else "",
        "--policies", str(ui_policy(tmp_path, billing, hooks)), "--data-dir", str(tmp_path / "data"),
        "--redis", redis_url, "--store-timeout", "2",
    ]  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    environment |= {"SIDECAR_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    stderr = tmp_path / "sidecar.stderr"
    with stderr.open("wb") as errors:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors, env=environment
        )
    running = Sidecar(f"http://{listen}", f"http://{admin}", billing, hooks, process, stderr)
    try:
        wait_ready(running.admin, process, stderr)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for receiver in (upstream, billing, hooks):
            receiver.stop()
