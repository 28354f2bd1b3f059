"""The policy in force: an immutable snapshot swapped in one assignment, or not at all.

Each request reads ``holder.current`` once; a reload builds and validates a whole new Policy
first, so a request sees either the old policy or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from pathlib import Path

from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.model import Policy
from sidecar.errors import PolicyInvalid

log = logging.getLogger("sidecar.config.policy")


class PolicyHolder:
    def __init__(self, path: Path, policy: Policy) -> None:
        self.path = path
        self.current = policy

    @classmethod
    def load(cls, path: Path) -> PolicyHolder:
        """Load the first policy; PolicyInvalid propagates (the sidecar must not start without one)."""
        with collector_paused():
            return cls(path, load_policy(path))

    def reload(self) -> Policy:
        """Load, validate, swap. On PolicyInvalid the old policy keeps serving and the error propagates."""
        try:
            with collector_paused():
                policy = load_policy(self.path)
        except PolicyInvalid as invalid:
            log.error("policy reload refused, keeping the policy in force:\n%s", invalid)
            raise
        self.current = policy
        log.info("policy reloaded: %s", policy.summary())
        return policy


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic-GC passes while a policy loads: loading allocates millions of objects that
    refcounting frees, and the passes their allocation triggers would scan them all the same
    (100,000 customers: 4.6 s to load without them, 8.8 s with)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def freeze_heap() -> None:
    """After the policy is loaded at startup: collect once, then exempt every object alive now
    (the policy, imported modules) from later collections, which then scan only what requests
    allocate. Forked workers share those pages instead of copying them as a collection touches
    them. Objects frozen are still freed by reference counting when a reload drops them."""
    gc.collect()
    gc.freeze()
