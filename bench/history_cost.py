"""What usage history costs Redis (SPEC §7): one day of a customer's windows, every one with
usage, closed by close.lua as the pusher closes them, then MEMORY USAGE of the history hashes it
left (plus about 50 bytes a key for its expiry and its entry in the key space, not counted by
MEMORY USAGE). Run against a redis-server of its own (or ``--redis``):

    python -m bench.history_cost [--redis redis://127.0.0.1:PORT/0]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from sidecar.store.history import DAY
from sidecar.store.redis import keys
from sidecar.store.redis.embedded import EmbeddedRedis
from sidecar.store.redis.store import RedisStore

FEATURES = ("search", "export", "complete")
CASES = ((60, 1), (60, 3), (300, 3), (1800, 3), (3600, 1), (86400, 1), (10, 1))
KEY_OVERHEAD = 50  # bytes a key costs outside its value: the key space and expires entries
CUSTOMER = "bench"


async def one_day(store: RedisStore, interval: int, pairs: int) -> tuple[int, int, int]:
    """(fields, keys, bytes) of the history one day of windows leaves."""
    await store.client.flushdb()
    day = int(time.time()) // DAY * DAY - DAY  # yesterday: closed, and within history_days
    fields = {
        f"{w}|requests|{feature}": 37 for w in range(day, day + DAY, interval) for feature in FEATURES[:pairs]
    }
    await store.client.hset(keys.usage(CUSTOMER), items=[part for field in fields.items() for part in field])
    await store.outbox.close(CUSTOMER, "pro", interval, day + DAY + interval, {"requests": "count"})
    found = [key async for key in store.client.scan_iter(match=f"{keys.customer_tag(CUSTOMER)}:h[hd]:*")]
    used = sum([int(await store.client.memory_usage(key, samples=0) or 0) for key in found])
    return len(fields), len(found), used + KEY_OVERHEAD * len(found)


async def measure(url: str) -> str:
    store = RedisStore.open(url, 5.0)
    lines = [
        "| window | (meter, feature) | fields a day | hashes a day | bytes a day | a field | 35 days |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    try:
        for interval, pairs in CASES:
            fields, hashes, used = await one_day(store, interval, pairs)
            lines.append(
                f"| {interval} s | {pairs} | {fields:,} | {hashes} | {used:,} | {used / fields:.0f} "
                f"| {used * 35 / 1e6:.2f} MB |"
            )
    finally:
        await store.close()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="")
    options = parser.parse_args()
    if options.redis:
        print(asyncio.run(measure(options.redis)))
        return
    with tempfile.TemporaryDirectory() as directory:
        server = EmbeddedRedis(Path(directory), persistent=False)
        try:
            print(asyncio.run(measure(server.start())))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
