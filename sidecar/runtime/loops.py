"""Which event loop runs the sidecar: asyncio's own, or uvloop (`--loop uvloop`, an optional extra).

uvloop is an option and not the default: it must be installed (`pip install 'quota-sidecar[uvloop]'`),
and what it buys was measured, not assumed (BENCHMARKS.md: about 10% less CPU per request).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from sidecar.config.settings import LOOPS, loop_available

__all__ = ["LOOPS", "loop_available", "run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """Run `main` to completion on a new event loop of the kind named."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
