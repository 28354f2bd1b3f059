"""The policy: frozen model, located-error loader, compiled routes, window arithmetic."""

from __future__ import annotations

from sidecar.errors import PolicyError, PolicyInvalid
from sidecar.policy.loader import load_policy
from sidecar.policy.model import Policy

__all__ = ["Policy", "PolicyError", "PolicyInvalid", "load_policy"]
