"""The policy in force: an immutable snapshot swapped in one assignment, or not at all.

Each request reads ``holder.current`` once; a reload builds and validates a whole new Policy
first, so a request sees either the old policy or the new one, never a mix.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sidecar.errors import PolicyInvalid
from sidecar.policy.loader import load_policy
from sidecar.policy.model import Policy

log = logging.getLogger("sidecar.policy")


class PolicyHolder:
    def __init__(self, path: Path, policy: Policy) -> None:
        self.path = path
        self.current = policy

    @classmethod
    def load(cls, path: Path) -> PolicyHolder:
        """Load the first policy; PolicyInvalid propagates (the sidecar must not start without one)."""
        return cls(path, load_policy(path))

    def reload(self) -> Policy:
        """Load, validate, swap. On PolicyInvalid the old policy keeps serving and the error propagates."""
        try:
            policy = load_policy(self.path)
        except PolicyInvalid as invalid:
            log.error("policy reload refused, keeping the policy in force:\n%s", invalid)
            raise
        self.current = policy
        log.info("policy reloaded: %s", policy.summary())
        return policy
