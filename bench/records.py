"""What the call records cost Redis (lib.lua remember_call): CPU per admission and memory.

Every admitted metering call keeps a record of what undoes it until a later call on its
connection says its reply was read, so a reply lost with its connection can be resolved by the
journal. This compares check_and_meter as it runs, against the same script with the two lines
that find the list and keep the record taken out, on a redis-server of its own:

* Redis CPU per call: the redis-server process's CPU time over the run (INFO cpu, user + sys),
  divided by the calls: unlike the wall-clock `usec_per_call` of INFO commandstats, it does not
  count the time Redis waited for a core the load generator held;
* memory: the record keys left after the run, and their bytes (MEMORY USAGE).

Each run makes `--calls` admissions in pipelines of 50 (as 50 requests in flight make them), for
one customer (its calls share each pipeline) and for 1,000 (one calendar quota, one moving window
and one usage field each, as a typical plan charges). The load generator shares the machine with
Redis, so the two variants are run in turn `--rounds` times and the least of each is reported.
Nothing here changes the sidecar.

    python -m bench.records [--calls 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from sidecar.config.policy.model import Limit
from sidecar.config.policy.windows import Period, calendar_window
from sidecar.store.port import LimitCharge, MeterRequest, UsageCharge
from sidecar.store.redis import keys
from sidecar.store.redis.calls import load_script
from sidecar.store.redis.embedded import EmbeddedRedis
from sidecar.store.redis.store import script_arguments

PIPELINE = 50  # calls per round trip, as 50 requests in flight make
TOKEN = "c0ffee0123456789"
HEADER = """| customers | check_and_meter | Redis µs per call | calls/s | record keys left | their bytes |
|---:|---|---:|---:|---:|---:|"""
KEEPS_RECORD = "if #steps > 0 then remember_call(req, steps) end"
FINDS_RECORDS = "open_call_records(req)\n"


def scripts() -> dict[str, str]:
    """check_and_meter as it is, and without the lines that find the list of call records and
    keep the call's record in it."""
    lib = load_script("lib", shared=False)
    body = load_script("check_and_meter", shared=False)
    for line in (KEEPS_RECORD, FINDS_RECORDS):
        if line not in body:
            raise SystemExit(f"check_and_meter.lua no longer has {line!r}: update this benchmark")
    without = body.replace(KEEPS_RECORD, "").replace(FINDS_RECORDS, "")
    return {"with records": f"{lib}\n{body}", "without": f"{lib}\n{without}"}


def request(customer: str, now: float) -> MeterRequest:
    day = Limit(meter="requests", limit=10**9, period=Period.DAY)
    minute = Limit(meter="requests", limit=10**9, period=Period.MINUTE)
    charges = (
        LimitCharge(day, 1, calendar_window(Period.DAY, now), True),
        LimitCharge(minute, 1, None, True),
    )
    return MeterRequest(customer, charges, (UsageCharge("requests", "search", 1, "+"),), 3600)


async def redis_cpu(client: aioredis.Redis) -> float:
    """Seconds of CPU the redis-server process has used (its main thread and the rest)."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def run(url: str, source: str, customers: int, calls: int) -> dict[str, float]:
    """`calls` admissions in pipelines of PIPELINE, named as the batcher names them on one
    connection (each pipeline written after the replies of the one before were read)."""
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    sha = await client.script_load(source)
    now = time.time()
    arguments = [script_arguments(request(f"c{n}", now)) for n in range(customers)]
    seq = answered = 0
    cpu_before = await redis_cpu(client)
    started = time.perf_counter()
    for first in range(0, calls, PIPELINE):
        pipe = client.pipeline(transaction=False)
        for n in range(first, min(first + PIPELINE, calls)):
            key_list, args = arguments[n % customers]
            seq += 1
            pipe.evalsha(sha, len(key_list), *key_list, *args, TOKEN, seq, answered)
        await pipe.execute()
        answered = seq
    wall = time.perf_counter() - started
    cpu = await redis_cpu(client) - cpu_before
    record_keys = [key async for key in client.scan_iter(match=f"{keys.PREFIX}:*:calls:*", count=1000)]
    record_bytes = sum([await client.memory_usage(key) or 0 for key in record_keys])
    await client.aclose()
    return {
        "usec_per_call": cpu * 1_000_000 / calls,
        "calls_per_second": calls / wall,
        "record_keys": len(record_keys),
        "record_bytes": record_bytes,
    }


async def main(calls: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        embedded = EmbeddedRedis(Path(directory))
        url = embedded.start()
        try:
            print(HEADER)
            for customers in (1, 1000):
                best: dict[str, dict[str, float]] = {}
                for _ in range(rounds):
                    for name, source in scripts().items():
                        found = await run(url, source, customers, calls)
                        if name not in best or found["usec_per_call"] < best[name]["usec_per_call"]:
                            best[name] = found
                for name, found in best.items():
                    print(
                        f"| {customers:,} | {name} | {found['usec_per_call']:.2f} | "
                        f"{found['calls_per_second']:,.0f} | {found['record_keys']:,.0f} | "
                        f"{found['record_bytes']:,.0f} |"
                    )
        finally:
            embedded.stop()


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.records", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="admissions per run (default 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant (default 3)")
    options = parser.parse_args()
    asyncio.run(main(options.calls, options.rounds))


if __name__ == "__main__":
    cli()
