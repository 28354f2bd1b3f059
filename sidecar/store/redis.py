"""The Redis store: the Lua scripts of store/lua, called by SHA, one round trip per operation.

The client never retries a script: a reply lost to a timeout does not say whether the script
ran, and running it again could charge twice. Every redis error and every timeout becomes
StoreUnavailable here, the one translation point.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sidecar.errors import StoreUnavailable
from sidecar.store import keys
from sidecar.store.base import (
    Admission,
    LimitCharge,
    LimitState,
    MeterRequest,
    Outcome,
)

T = TypeVar("T")
# Connections per sidecar process: enough to keep Redis busy, few enough not to crowd it with replicas.
MAX_CONNECTIONS = 64
_OUTCOMES = {1: Outcome.ADMITTED, 0: Outcome.REFUSED, -1: Outcome.STALE}


def load_script(name: str, *, shared: bool = True) -> str:
    """A script's source, with the shared lib.lua in front of it unless ``shared`` is False."""
    lua = resources.files("sidecar.store").joinpath("lua")
    source = lua.joinpath(f"{name}.lua").read_text()
    return lua.joinpath("lib.lua").read_text() + "\n" + source if shared else source


def connect(url: str, timeout: float, *, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """A client whose every wait (connect, reply, a free pooled connection) is bounded by `timeout`
    and which never retries by itself."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis.from_pool(pool)


class RedisStore:
    def __init__(self, client: aioredis.Redis, *, timeout: float) -> None:
        self.client = client
        self._timeout = timeout
        self._clock_offset = 0.0
        self._check = client.register_script(load_script("check_and_meter"))
        self._read = client.register_script(load_script("read_limits"))
        self._charge = client.register_script(load_script("charge"))

    def time(self) -> float:
        return time.time() + self._clock_offset

    async def check_and_meter(self, request: MeterRequest) -> Admission:
        reply = await self._call(self._check(*_meter_arguments(request)))
        return self._admission(reply, request.limits)

    async def charge(self, request: MeterRequest) -> Admission:
        reply = await self._call(self._charge(*_meter_arguments(request)))
        return self._admission(reply, ())

    async def read_limits(self, customer_id: str, charges: tuple[LimitCharge, ...]) -> Admission:
        key_list, args = _limit_arguments(customer_id, charges)
        reply = await self._call(self._read(keys=key_list, args=args))
        return self._admission(reply, charges, has_over=False)

    async def ping(self) -> None:
        await self._call(self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()

    async def _call(self, operation: Awaitable[T]) -> T:
        return await bounded(operation, self._timeout)

    def _admission(
        self, reply: Sequence[Any], charges: tuple[LimitCharge, ...], *, has_over: bool = True
    ) -> Admission:
        store_time = int(reply[1]) + int(reply[2]) / 1e6
        self._clock_offset = store_time - time.time()
        outcome = _OUTCOMES[int(reply[0])]
        if outcome is Outcome.STALE:
            return Admission(outcome, store_time, ())
        stride = 3 if has_over else 2
        states = tuple(
            LimitState(
                charge=charge,
                used=int(reply[3 + i * stride]),
                reset_seconds=int(reply[4 + i * stride]) / 1e6,
                over=has_over and bool(int(reply[5 + i * stride])),
            )
            for i, charge in enumerate(charges)
        )
        return Admission(outcome, store_time, states)


async def bounded(operation: Awaitable[T], timeout: float) -> T:
    """Await a redis call for at most `timeout`; every failure becomes StoreUnavailable."""
    try:
        async with asyncio.timeout(timeout):
            return await operation
    except (RedisError, TimeoutError, OSError) as error:
        raise StoreUnavailable(f"store did not answer: {type(error).__name__}") from error


def _meter_arguments(request: MeterRequest) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of check_and_meter.lua and charge.lua: the limits, then the usage."""
    key_list, args = _limit_arguments(request.customer_id, request.limits)
    key_list.append(keys.usage(request.customer_id))
    args[0] = request.billing_interval
    for charge in request.usage:
        suffix = f"{charge.meter}|{charge.feature}"
        if charge.op == "uniq":
            suffix = f"{suffix}|{charge.distinct}"
        args += (suffix, charge.op, charge.amount)
    return key_list, args


def _limit_arguments(customer_id: str, charges: tuple[LimitCharge, ...]) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the limit part of both scripts (ARGV[1] is filled by the caller)."""
    key_list: list[str] = []
    args: list[Any] = [0, len(charges)]
    for charge in charges:
        limit = charge.limit
        mode = "h" if charge.enforced else "s"
        if charge.window is None:
            key_list += (keys.rate_log(customer_id, limit.name), keys.rate_total(customer_id, limit.name))
            args += ("r", charge.amount, limit.ceiling, mode, limit.period.seconds * 1_000_000, 0)
        else:
            key_list.append(keys.quota(customer_id, limit.name, charge.window[0]))
            args += ("c", charge.amount, limit.ceiling, mode, *charge.window)
    return key_list, args
