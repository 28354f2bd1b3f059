"""The policy: frozen model, located-error loader, compiled routes, window arithmetic."""

from __future__ import annotations

from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.model import Policy
from sidecar.errors import PolicyError, PolicyInvalid

__all__ = ["Policy", "PolicyError", "PolicyInvalid", "load_policy"]
