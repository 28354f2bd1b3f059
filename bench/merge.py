"""How fast the journal merges into the store after an outage (journal.py, _merge_segment).

A journal of `--entries` admissions over `--customers` customers (one calendar quota and one
usage field each) is merged into a redis-server of its own, as `sidecar run` merges it once the
store answers again. Each round trip to Redis is made `--rtt-ms` longer by a relay in a process
of its own that holds every reply that long (a Redis under load, or one across a network; 0: no
relay). It prints the entries merged per second with the customers merged side by side
(journal.MERGE_LANES) and, for comparison, one entry at a time. Nothing here changes the sidecar.

    python -m bench.merge [--entries 5000] [--customers 100] [--rtt-ms 0 1]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from pathlib import Path
from unittest import mock

from sidecar.config.policy.model import Limit
from sidecar.config.policy.windows import Period, calendar_window
from sidecar.ledger import journal
from sidecar.ledger.journal import Journal
from sidecar.store.port import LimitCharge, MeterRequest, UsageCharge
from sidecar.store.redis.embedded import EmbeddedRedis, free_port
from sidecar.store.redis.store import RedisStore

STORE_TIMEOUT = 2.0  # generous: the bench measures the merge, not the timeout


def admission(customer: str, now: float) -> MeterRequest:
    limit = Limit(meter="requests", limit=10**9, period=Period.MONTH)
    charge = LimitCharge(limit, 1, calendar_window(Period.MONTH, now), True)
    return MeterRequest(customer, (charge,), (UsageCharge("requests", "search", 1, "+"),), 60)


async def merge_rate(url: str, entries: int, customers: int) -> float:
    store = RedisStore.open(url, STORE_TIMEOUT)
    try:
        await store.connect()
        now = store.time()
        kept = Journal(Path(tempfile.mkdtemp(prefix="bench-merge-")))
        for n in range(entries):
            kept.record(admission(f"customer-{n % customers}", now), now)
        started = time.perf_counter()
        merged = await kept.replay(store.replay)
        took = time.perf_counter() - started
        kept.close()
        if merged != entries:
            raise RuntimeError(f"merged {merged} of {entries}")
        return merged / took
    finally:
        await store.close()


def _relay(target_port: int, port: int, rtt: float) -> None:
    """Relay 127.0.0.1:port to Redis, each reply held `rtt` seconds (in order, overlapping)."""

    async def pipe_back(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            while True:
                due, data = await held.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)

        releasing = asyncio.create_task(release())
        while data := await reader.read(65536):
            held.put_nowait((time.monotonic() + rtt, data))
        releasing.cancel()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(forward(reader, redis_writer), pipe_back(redis_reader, writer))

    async def serve() -> None:
        server = await asyncio.start_server(connection, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def measure(url: str, port: int, entries: int, customers: int, rtt_ms: float) -> tuple[float, float]:
    relay = None
    if rtt_ms:
        relay_port = free_port()
        relay = multiprocessing.Process(target=_relay, args=(port, relay_port, rtt_ms / 1000), daemon=True)
        relay.start()
        time.sleep(0.5)
        url = f"redis://127.0.0.1:{relay_port}/0"
    try:
        side_by_side = asyncio.run(merge_rate(url, entries, customers))
        with mock.patch.object(journal, "MERGE_LANES", 1):
            one_at_a_time = asyncio.run(merge_rate(url, entries, customers))
    finally:
        if relay is not None:
            relay.kill()
            relay.join(5)
    return side_by_side, one_at_a_time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--customers", type=int, default=100)
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 1.0])
    options = parser.parse_args()
    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="bench-merge-redis-")), persistent=False)
    server.start()
    try:
        print(f"{options.entries} entries over {options.customers} customers, entries merged per second:")
        print(f"| added round trip | {journal.MERGE_LANES} customers side by side | one entry at a time |")
        print("|---:|---:|---:|")
        for rtt_ms in options.rtt_ms:
            lanes, serial = measure(server.url, server.port, options.entries, options.customers, rtt_ms)
            print(f"| {rtt_ms:g} ms | {lanes:,.0f} | {serial:,.0f} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
