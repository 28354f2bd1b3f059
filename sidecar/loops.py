"""Which event loop runs the sidecar: asyncio's own, or uvloop (`--loop uvloop`, an optional extra).

uvloop is an option and not the default: it must be installed (`pip install 'quota-sidecar[uvloop]'`),
and what it buys was measured, not assumed (BENCHMARKS.md: about 10% less CPU per request).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LOOPS = ("asyncio", "uvloop")


def available(name: str) -> bool:
    return name == "asyncio" or (name == "uvloop" and importlib.util.find_spec("uvloop") is not None)


def run(main: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """Run `main` to completion on a new event loop of the kind named."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
