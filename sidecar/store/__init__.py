"""The store: a narrow contract (base.py) and its Redis implementation with atomic Lua scripts."""

from __future__ import annotations

from sidecar.errors import StoreUnavailable
from sidecar.store.port import (
    Admission,
    LimitCharge,
    LimitState,
    MeterRequest,
    Outcome,
    Store,
    UsageCharge,
)

__all__ = [
    "Admission",
    "LimitCharge",
    "LimitState",
    "MeterRequest",
    "Outcome",
    "Store",
    "StoreUnavailable",
    "UsageCharge",
]
