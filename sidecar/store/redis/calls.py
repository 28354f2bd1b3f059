"""What every redis-py call of the store shares: the Lua sources it registers, and its time bound.

The store has one redis-py client (store.py), used by operations with different patience: the
requests' own (ping, grant, a journal merge) wait the store timeout, 50 ms by default, while
billing and the customer refresh, off the request path, wait BACKGROUND_TIMEOUT. The client's
own socket and pool bounds are the longest of them, and each operation is cut to its own bound
by ``bounded``; a call cut short closes its connection (redis-py does on cancellation), so a
late reply is never read as the next call's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from importlib import resources
from typing import TypeVar

from redis.exceptions import RedisError

from sidecar.errors import StoreUnavailable

T = TypeVar("T")
# Seconds background work (billing, the customer refresh) may wait for one call: longer than a
# request can, since nobody waits on it and an outage only delays it.
BACKGROUND_TIMEOUT = 2.0


SHARED_SOURCES = ("lib.lua", "notify_lib.lua")


def load_script(name: str, *, shared: bool = True) -> str:
    """A script's source (lua/<name>.lua), with the shared SHARED_SOURCES in front of it unless
    ``shared`` is False."""
    lua = resources.files("sidecar.store.redis").joinpath("lua")
    source = lua.joinpath(f"{name}.lua").read_text()
    if not shared:
        return source
    return "\n".join([*(lua.joinpath(part).read_text() for part in SHARED_SOURCES), source])


async def bounded(operation: Awaitable[T], timeout: float) -> T:
    """Await a redis call for at most `timeout`; every failure becomes StoreUnavailable."""
    try:
        async with asyncio.timeout(timeout):
            return await operation
    except (RedisError, TimeoutError, OSError) as error:
        raise StoreUnavailable(f"store did not answer: {type(error).__name__}") from error
