"""`sidecar run`: own the store (embedded or external), serve both ports, drain on SIGTERM.

Shutdown order: stop accepting on the proxy port, let in-flight requests finish (up to the drain
timeout), close the admin port, close the store client, stop the embedded redis-server last.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Coroutine
from contextlib import AsyncExitStack

from aiohttp import web

from sidecar import tasks
from sidecar.billing.notifier import Notifier
from sidecar.billing.pusher import Pusher
from sidecar.billing.sender import http_session
from sidecar.config.policy.holder import PolicyHolder, freeze_heap
from sidecar.config.settings import Settings
from sidecar.errors import StoreUnavailable
from sidecar.http.app import build_admin_app, build_proxy_app
from sidecar.http.components import COMPONENTS, Components, open_components
from sidecar.http.intake import GuardedSite
from sidecar.http.reloading import reload_policy, watch
from sidecar.ledger.journal import Journal
from sidecar.ledger.merger import Merger, run_ledger
from sidecar.metrics import Metrics
from sidecar.store.redis.embedded import EmbeddedRedis

log = logging.getLogger("sidecar")


async def serve(settings: Settings, holder: PolicyHolder, *, admin: bool = True) -> None:
    """Run until SIGTERM or SIGINT, then drain and return. SIGHUP reloads the policy. `admin`
    False: the proxy port only (a worker other than the first, see workers.py)."""
    freeze_heap()  # the policy just loaded: full collections need not scan it again
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    reloads: set[asyncio.Task[object]] = set()
    async with AsyncExitStack() as stack:
        url = settings.redis_url or await _embedded_store(stack, settings)
        journal = Journal(settings.data_dir / "journal")
        # One client stack for the process, connected now (the first burst of requests must not
        # wait for it), closed after everything below has stopped.
        components = await stack.enter_async_context(open_components(settings, holder, url, journal=journal))
        store, metrics = components.store, components.metrics
        metrics.policy_loaded.set(time.time())
        await _pusher(stack, components)
        await _notifier(stack, components)
        merger = Merger(journal, store, metrics, billed=functools.partial(_note_billing, components))
        await run_ledger(stack, merger, fences=components.outbox)
        await _background(stack, watch(components, stopping))
        await _background(stack, _share_store_traffic(metrics))
        loop.add_signal_handler(signal.SIGHUP, _start_reload, components, reloads)
        # The proxy port opens first (/readyz answering 200 must mean requests can be served) and
        # closes first (it drains while the admin port still answers).
        sites: list[web.AppRunner] = []
        stack.push_async_callback(_close_sites, sites)
        await _site(sites, build_proxy_app(components), settings, admin=False)
        if admin:
            await _site(sites, build_admin_app(components), settings, admin=True)
        log.info("serving %s → %s; admin on %s", settings.listen, settings.upstream, settings.admin)
        await stopping.wait()
        log.info("stopping: draining in-flight requests (up to %ss)", settings.drain_timeout)


async def _share_store_traffic(metrics: Metrics) -> None:
    """Under --workers, copy this worker's store traffic (its source set by open_components) into
    the shared counters once a second (metrics.py): the admin port is worker 0's, and it must
    count every worker's round trips."""
    while metrics.multiprocess_dir is not None:
        await asyncio.sleep(1.0)
        metrics.sync_store_traffic()


async def _pusher(stack: AsyncExitStack, components: Components) -> None:
    """Run the billing pusher beside the servers; on shutdown (after the proxy drained, so every
    charge is in) it stops, and one last cycle pushes whatever windows have closed."""
    session = http_session()
    stack.push_async_callback(session.close)
    pusher = Pusher(
        holder=components.holder,
        outbox=components.outbox,
        marks=components.marks,
        session=session,
        metrics=components.metrics,
        clock=components.store.time,
        directory=components.directory,
        secret=components.settings.billing_secret,
        token=components.settings.billing_token,
        held_back=(lambda: journal.voiding) if (journal := components.journal) else frozenset,
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(pusher.run(stopping))

    async def stop() -> None:
        stopping.set()
        await task
        await pusher.cycle()

    stack.push_async_callback(stop)


async def _notifier(stack: AsyncExitStack, components: Components) -> None:
    """Deliver threshold notifications beside the pusher; on shutdown one last cycle sends what
    the drained requests recorded (what it cannot send waits in the store for the next replica)."""
    session = http_session()
    stack.push_async_callback(session.close)
    notifier = Notifier(
        holder=components.holder,
        outbox=components.store.notifications,
        session=session,
        metrics=components.metrics,
        clock=components.store.time,
        secret=components.settings.billing_secret,
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(notifier.run(stopping))

    async def stop() -> None:
        stopping.set()
        await task
        with contextlib.suppress(StoreUnavailable):
            await notifier.cycle()

    stack.push_async_callback(stop)


async def _background(stack: AsyncExitStack, work: Coroutine[object, object, None]) -> None:
    """Run `work` until shutdown, then stop it (tasks.stop: it may be cancelled more than once, so
    what must happen at the end is a callback of its own)."""
    task = asyncio.create_task(work)
    stack.push_async_callback(tasks.stop, task)


def _note_billing(components: Components, customer: str, at: float) -> None:
    """A merged journal entry's usage is in the store: its billing window is to be closed."""
    billing = components.holder.current.billing
    if billing is not None:
        components.marks.note(customer, at, billing)


async def _close_sites(sites: list[web.AppRunner]) -> None:
    """Close the sites in the order they opened: the proxy's drain first, then the admin port."""
    for runner in sites:
        await runner.cleanup()


def _start_reload(components: Components, running: set[asyncio.Task[object]]) -> None:
    task: asyncio.Task[object] = asyncio.ensure_future(reload_policy(components))
    running.add(task)  # held until done: the loop keeps only weak references to tasks
    task.add_done_callback(running.discard)


async def _embedded_store(stack: AsyncExitStack, settings: Settings) -> str:
    embedded = EmbeddedRedis(settings.data_dir / "redis")
    url = await asyncio.to_thread(embedded.start)
    stack.push_async_callback(asyncio.to_thread, embedded.stop)
    log.info("embedded redis-server on %s, data in %s", url, embedded.data_dir)
    return url


async def _site(sites: list[web.AppRunner], app: web.Application, settings: Settings, *, admin: bool) -> None:
    address = settings.admin if admin else settings.listen
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=settings.drain_timeout, handle_signals=False
    )
    await runner.setup()
    sites.append(runner)
    metrics = app[COMPONENTS].metrics
    shared = not admin and settings.workers > 1  # every worker listens on the proxy port
    await GuardedSite(
        runner, address.host, address.port, settings=settings, metrics=metrics, reuse_port=shared
    ).start()
