"""Putting an edited policy in force: on SIGHUP, on POST /admin/reload, and when a file changes.

A reload loads and validates a whole new policy off the event loop, then swaps it in one
assignment; a refused one leaves the old policy serving, is logged, and is counted. The watcher
compares the policy files' names, sizes and modification times once a second, so an edit, a new
file in a policy directory or a removed one is picked up without a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from sidecar.errors import PolicyInvalid
from sidecar.http.components import Components

log = logging.getLogger("sidecar.config.policy")

WATCH_SECONDS = 1.0
Fingerprint = tuple[tuple[str, int, int], ...]


async def reload_policy(components: Components) -> PolicyInvalid | None:
    """Load the policy files off the event loop and swap them in; a refusal keeps the old policy."""
    try:
        await asyncio.to_thread(components.holder.reload)
    except PolicyInvalid as invalid:
        components.metrics.policy_reloads.labels("refused").inc()
        return invalid
    components.metrics.policy_reloads.labels("applied").inc()
    components.metrics.policy_loaded.set(time.time())
    return None


def fingerprint(path: Path) -> Fingerprint:
    """(name, size, mtime) of the policy file, or of every *.yaml / *.yml in the directory."""
    try:
        names = (
            [path]
            if not path.is_dir()
            else sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        )
        return tuple((str(p), (stat := p.stat()).st_size, stat.st_mtime_ns) for p in names)
    except OSError:
        return ()


async def watch(components: Components, stopping: asyncio.Event) -> None:
    """Reload whenever the policy files change, until `stopping` is set."""
    path = components.holder.path
    seen = await asyncio.to_thread(fingerprint, path)
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), WATCH_SECONDS)
        current = await asyncio.to_thread(fingerprint, path)
        if current != seen:
            seen = current
            log.info("policy files changed on disk: reloading")
            await reload_policy(components)
