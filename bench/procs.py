"""Child processes of the benchmark: started pinned to a core (or a set of cores), stopped by pid,
never left behind.

Every process the bench starts is registered here; `stop_all()` (called from a `finally` and on
SIGTERM/SIGINT/SIGALRM) stops whatever is still running, SIGTERM first, SIGKILL after a bound.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

STOP_TIMEOUT = 10.0
# Where a child may run: one core, a set of cores, or None (wherever the bench itself may).
Cores = int | tuple[int, ...] | None
_running: list[Proc] = []
# The CPUs this process may use when the bench starts (before it pins itself to one of them).
_ALLOWED = tuple(sorted(os.sched_getaffinity(0)))


def allowed_cores() -> tuple[int, ...]:
    return _ALLOWED


def cores() -> int:
    return len(_ALLOWED)


def pinning_available() -> bool:
    return cores() >= 2


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, so that no client socket (wrk's
    50, the proxies' upstream and Redis connections) can take it between this probe and the
    server's bind; an OS-assigned one if that range is too narrow."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100 if low > 11000 else 0):
        port = random.randint(10000, low - 1)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def core_set(core: Cores) -> tuple[int, ...]:
    """The cores of `core` as a tuple (empty for None)."""
    if core is None:
        return ()
    return (core,) if isinstance(core, int) else core


def core_list(core: Cores) -> str:
    """taskset's spelling: "1", "0,1"."""
    return ",".join(str(c) for c in core_set(core))


def pin_existing(pid: int, core: Cores) -> None:
    """Pin every thread of a running process to `core` (taskset -a -p, or sched_setaffinity)."""
    if not core_set(core) or not pinning_available():
        return
    if shutil.which("taskset"):
        subprocess.run(
            ["taskset", "-a", "-cp", core_list(core), str(pid)], check=True, stdout=subprocess.DEVNULL
        )
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), set(core_set(core)))


def pinned(argv: Sequence[str], core: Cores) -> list[str]:
    """`taskset -c CORES argv...` (taskset execs, so the pid is argv's own); argv as is without it.
    A set of cores is set explicitly too: a child inherits the bench's own pinning otherwise."""
    if not core_set(core) or not pinning_available():
        return list(argv)
    if shutil.which("taskset"):
        return ["taskset", "-c", core_list(core), *argv]
    return list(argv)  # pinned after the start by pin_existing


def child_env() -> dict[str, str]:
    """The environment for children, without SIDECAR_* settings that would override the flags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    def __init__(self, name: str, argv: Sequence[str], *, core: Cores, log: Path) -> None:
        self.name = name
        self.core = core
        self.log_path = log
        self._log: IO[bytes] = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            pinned(argv, core),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env(),
            start_new_session=True,  # a Ctrl-C in the terminal reaches the bench only; it stops them
        )
        _running.append(self)
        if core_set(core) and not shutil.which("taskset"):
            pin_existing(self.popen.pid, core)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_listening(self, port: int, timeout: float) -> float:
        """Seconds from the start until `port` accepts; raises if the process dies or time runs out."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return time.monotonic() - self.started
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on {port} within {timeout:.0f}s: {self.log_tail()}")

    def memory_kib(self) -> dict[str, int]:
        """VmHWM (peak resident set) and VmRSS of the process, in KiB, from /proc/<pid>/status;
        summed over its children too (`--workers`), pages they share counted in each."""
        found: dict[str, int] = {}
        for pid in process_tree(self.pid):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    name, _, value = line.partition(":")
                    if name in ("VmHWM", "VmRSS"):
                        found[name] = found.get(name, 0) + int(value.split()[0])
        return found

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait()
        if self in _running:
            _running.remove(self)
        self._log.close()
        return self.popen.returncode

    def log_tail(self, chars: int = 2000) -> str:
        self._log.flush()
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (Linux /proc); just the process where that is not readable."""
    tree, index = [pid], 0
    while index < len(tree):
        with contextlib.suppress(OSError, ValueError):
            children = Path(f"/proc/{tree[index]}/task/{tree[index]}/children").read_text().split()
            tree += [int(child) for child in children]
        index += 1
    return tree


def run_bounded(argv: Sequence[str], *, core: Cores, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a short-lived command pinned to `core`, killed (its whole session) after `timeout`."""
    process = subprocess.Popen(
        pinned(argv, core),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        start_new_session=True,
    )
    if core_set(core) and not shutil.which("taskset"):
        pin_existing(process.pid, core)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise RuntimeError(f"{argv[0]} ran over its {timeout:.0f}s bound and was killed") from None
    return subprocess.CompletedProcess(list(argv), process.returncode, out, err)


def stop_all() -> None:
    for proc in list(reversed(_running)):
        proc.stop()
