"""`sidecar run --workers N`: N processes serving one proxy port through SO_REUSEPORT.

One Python process is one core: past that, the sidecar scales by processes. The parent loads and
validates the policy once, starts the embedded store when there is one (so every worker shares
the same Redis), freezes its heap (the policy's pages then stay shared, copy-on-write, instead of
being touched by every worker's garbage collector) and forks the workers. Each worker runs
``server.serve`` with its own event loop, store connections, upstream session, billing pusher and
policy watcher; every listening socket on the proxy port has SO_REUSEPORT, and the kernel spreads
new connections over them. Exactness is the store's: workers are replicas that share a process
group.

Worker 0 alone serves the admin port. Its /metrics counts every worker: the parent clears
``<data-dir>/metrics`` and each worker keeps its values there (prometheus-client's multiprocess
mode, metrics.py); the store-backed answers, /readyz and /admin/, are the same from any worker.
A policy reload reaches every worker: SIGHUP to the parent is forwarded to each, and each
watches the policy files.

The parent forwards SIGTERM and SIGINT (drain, flush, exit) and SIGHUP to every worker and waits
for them. A worker that exits on its own is a failure: the parent stops the others and exits 1,
so that the supervisor (systemd, Kubernetes) restarts the sidecar whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
from pathlib import Path
from types import FrameType

from sidecar import metrics
from sidecar.config.policy.holder import PolicyHolder, freeze_heap
from sidecar.config.settings import Settings
from sidecar.runtime import logs, loops
from sidecar.store.redis.embedded import EmbeddedRedis

log = logging.getLogger("sidecar.runtime.workers")

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_workers(settings: Settings, holder: PolicyHolder) -> int:
    """Serve with `settings.workers` processes until SIGTERM or SIGINT; 0 when all stopped cleanly."""
    with contextlib.ExitStack() as stack:
        url = settings.redis_url
        if url is None:
            embedded = EmbeddedRedis(settings.data_dir / "redis")
            url = embedded.start()
            stack.callback(embedded.stop)
            log.info("embedded redis-server on %s, data in %s", url, embedded.data_dir)
        shared = dataclasses.replace(settings, redis_url=url)
        metrics.clear_multiprocess(metrics_dir(settings))
        freeze_heap()
        return _Supervisor().run(shared, holder)


class _Supervisor:
    def __init__(self) -> None:
        self.children: dict[int, int] = {}  # pid → worker index
        self.stopping = False
        self.failed = False
        self.metrics_dir = Path()

    def run(self, settings: Settings, holder: PolicyHolder) -> int:
        self.metrics_dir = metrics_dir(settings)
        for signum in _FORWARDED:  # before the forks: a signal must never find the parent undecided
            signal.signal(signum, self._forward)
        for index in range(settings.workers):
            self.children[_fork(index, settings, holder)] = index
        log.info("%d workers serving %s", settings.workers, settings.listen)
        while self.children:
            pid, status = os.waitpid(-1, 0)
            if pid in self.children:
                self._exited(self.children.pop(pid), pid, os.waitstatus_to_exitcode(status))
        return 1 if self.failed else 0

    def _exited(self, index: int, pid: int, code: int) -> None:
        metrics.worker_exited(self.metrics_dir, pid)
        if self.stopping:
            self.failed = self.failed or code != 0
            return
        log.error("worker %d (pid %d) exited with %d; stopping the other workers", index, pid, code)
        self.failed = self.stopping = True
        self._signal_all(signal.SIGTERM)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGHUP:
            self.stopping = True
        self._signal_all(signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def metrics_dir(settings: Settings) -> Path:
    """Where the workers keep their metric values (under the data dir: writable on a read-only
    root filesystem, and one directory per sidecar)."""
    return settings.data_dir / "metrics"


def _fork(index: int, settings: Settings, holder: PolicyHolder) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)  # none may reach the child's copy of _forward
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        return pid
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # serve() installs the loop's own handlers
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload before serve() is up: nothing to do
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        metrics.use_multiprocess(metrics_dir(settings))
        logs.name_worker(index)
        from sidecar.runtime.server import serve

        loops.run(serve(settings, holder, admin=index == 0), settings.loop)
        code = 0
    except BaseException:
        log.exception("worker %d failed", index)
    finally:
        logging.shutdown()
        os._exit(code)  # never the parent's cleanup (the embedded store is the parent's)
