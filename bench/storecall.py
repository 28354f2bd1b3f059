"""The store call alone, without HTTP: what one admission's EVALSHA costs the sidecar's process,
as the sidecar makes it (through its batcher), as it made it before (one redis-py EVALSHA per
call), and stripped-down variants of both.

Each variant makes `--calls` calls from 50 concurrent callers (as 50 connections would) against
the real redis-server, after a warm-up (which opens the pool's connections), and reports CPU
(time.process_time) and wall-clock per call, and the calls that failed with the sidecar's 50 ms
store timeout. Nothing here changes the sidecar.

    python -m bench.storecall --redis redis://127.0.0.1:PORT/0 --policy bench.yaml [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
import timeit
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sidecar.admission import gate
from sidecar.admission.plan import meter_request
from sidecar.config.policy.loader import load_policy
from sidecar.errors import StoreUnavailable
from sidecar.store.port import Admission, MeterRequest
from sidecar.store.redis.calls import bounded
from sidecar.store.redis.store import RedisStore, script_arguments

CALLERS = 50
NAME_TOKEN = "bench-storecall"  # the token of the calls made here without the batcher
STORE_TIMEOUT = 0.05  # the sidecar's --store-timeout default


async def _measure(call: Callable[[], Awaitable[object]], calls: int) -> tuple[float, float, int, int]:
    """CPU and wall µs per call, `calls` calls spread over CALLERS concurrent callers; and how many
    calls failed (StoreUnavailable: the store timeout) in the warm-up and in the measured part."""
    failed = 0

    async def caller(n: int) -> None:
        nonlocal failed
        for _ in range(n):
            try:
                await call()
            except (StoreUnavailable, RedisError, TimeoutError):
                failed += 1

    await asyncio.gather(*(caller(max(1, calls // 10 // CALLERS)) for _ in range(CALLERS)))  # warm-up
    warmup_failed, failed = failed, 0
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(calls // CALLERS) for _ in range(CALLERS)))
    done = calls // CALLERS * CALLERS
    return (
        (time.process_time() - cpu) / done * 1e6,
        (time.perf_counter() - wall) / done * 1e6,
        warmup_failed,
        failed,
    )


async def _measure_batched(
    run_batch: Callable[[], Awaitable[object]], calls: int
) -> tuple[float, float, int, int]:
    """The same, when every CALLERS calls travel as one pipeline (one round trip)."""
    for _ in range(max(1, calls // 10 // CALLERS)):
        await run_batch()
    cpu, wall = time.process_time(), time.perf_counter()
    batches = calls // CALLERS
    for _ in range(batches):
        await run_batch()
    done = batches * CALLERS
    return (time.process_time() - cpu) / done * 1e6, (time.perf_counter() - wall) / done * 1e6, 0, 0


async def run(url: str, policy_path: str, calls: int, only_sidecar: bool, repeats: int) -> dict[str, object]:
    policy = load_policy(policy_path)
    customer = policy.customers["customer-0"]
    spec = policy.charges[(customer.plan, "hello")]
    store = RedisStore.open(url, STORE_TIMEOUT)
    plain = aioredis.Redis.from_url(url)  # default pool, no timeouts
    try:
        await store.ping()
        variants: list[dict[str, object]] = []

        async def add(name: str, measured: tuple[float, float, int, int]) -> None:
            cpu, wall, warmup_failed, failed = measured
            for entry in variants:
                if entry["name"] == name:  # a repeat: keep the cheapest, add up the failures
                    entry["cpu_us"] = min(cpu, float(entry["cpu_us"]))  # type: ignore[arg-type]
                    entry["wall_us"] = min(wall, float(entry["wall_us"]))  # type: ignore[arg-type]
                    entry["warmup_failed"] = int(entry["warmup_failed"]) + warmup_failed  # type: ignore[call-overload]
                    entry["failed"] = int(entry["failed"]) + failed  # type: ignore[call-overload]
                    return
            entry = {"name": name, "cpu_us": cpu, "wall_us": wall}
            variants.append({**entry, "warmup_failed": warmup_failed, "failed": failed})

        request = meter_request(policy, customer, "hello", spec, store.time())
        key_list, args = script_arguments(request)
        script = store._check  # the sidecar's own script, called through its batcher
        legacy = store.client.register_script(script.source)  # the same, as redis-py's Script
        await plain.script_load(script.source)
        numbers = itertools.count(1)

        def named(arguments: list[Any]) -> list[Any]:
            """The arguments with a call's name, as the batcher appends it (one call at a time)."""
            seq = next(numbers)
            return [*arguments, NAME_TOKEN, seq, seq - 1]

        def evalsha_arguments() -> list[Any]:
            return [script.sha, len(key_list), *key_list, *named(args)]

        async def unbatched(request: MeterRequest) -> Admission:
            """check_and_meter as it was before the batcher: one EVALSHA per call through redis-py."""
            call_keys, call_args = script_arguments(request)
            reply = await bounded(legacy(call_keys, named(call_args)), STORE_TIMEOUT)
            return store._admission(reply, request)

        async def batch() -> None:
            pipe = plain.pipeline(transaction=False)
            for _ in range(CALLERS):
                pipe.evalsha(*evalsha_arguments())
            await pipe.execute()

        for _ in range(repeats):
            await add(
                "as the sidecar calls it: batched (windows, arguments, the batcher, the reply parsed)",
                await _measure(
                    lambda: gate.at_store_time(
                        store,
                        store.check_and_meter,
                        lambda now: meter_request(policy, customer, "hello", spec, now),
                    ),
                    calls,
                ),
            )
            await add(
                "as the sidecar called it before the batcher: one EVALSHA per call (windows, arguments, "
                "asyncio.timeout, BlockingConnectionPool, Script, the reply parsed)",
                await _measure(
                    lambda: gate.at_store_time(
                        store,
                        unbatched,
                        lambda now: meter_request(policy, customer, "hello", spec, now),
                    ),
                    calls,
                ),
            )
            if not only_sidecar:
                await add(
                    "the batcher alone: arguments precomputed, the reply left unparsed",
                    await _measure(lambda: script(key_list, args), calls),
                )
                await add(
                    "before the batcher, arguments precomputed and the reply left unparsed",
                    await _measure(lambda: store._call(lambda: legacy(key_list, named(args))), calls),
                )
                await add(
                    "same, without the outer asyncio.timeout (`bounded`) and the Script wrapper",
                    await _measure(lambda: store.client.evalsha(*evalsha_arguments()), calls),
                )
                await add(
                    "bare EVALSHA: default pool, no timeouts, precomputed arguments",
                    await _measure(lambda: plain.evalsha(*evalsha_arguments()), calls),
                )
                await add(
                    f"redis-py's pipeline: {CALLERS} EVALSHAs in one pipeline, one round trip",
                    await _measure_batched(batch, calls),
                )
        windows = timeit.repeat(
            lambda: script_arguments(meter_request(policy, customer, "hello", spec, time.time())),
            number=2000,
            repeat=3,
        )
        return {"variants": variants, "arguments_us": min(windows) / 2000 * 1e6}
    finally:
        await store.close()
        await plain.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.storecall")
    parser.add_argument("--redis", required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3, help="each variant's cheapest of this many runs")
    parser.add_argument("--uvloop", action="store_true", help="run only the sidecar's call, on uvloop")
    args = parser.parse_args()
    calls = max(CALLERS, min(args.calls, 50_000))
    repeats = max(1, min(args.repeats, 5))
    coroutine = run(args.redis, args.policy, calls, only_sidecar=args.uvloop, repeats=repeats)
    if args.uvloop:
        import uvloop

        result = uvloop.run(coroutine)
    else:
        result = asyncio.run(coroutine)
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
