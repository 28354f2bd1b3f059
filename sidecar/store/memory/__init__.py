"""The Store port in memory, for tests: admission's part of it (check_and_meter, charge,
read_limits, grant), with the semantics of the Lua scripts (store.py); one class per limit
algorithm (limits.py)."""

from __future__ import annotations

from sidecar.store.memory.store import MemoryStore

__all__ = ["MemoryStore"]
