"""How many usage records one replica takes a second: POST /admin/events in batches (issue 16).

Not bench/records.py, which measures what the metering calls' records (lost replies) cost Redis.

One `sidecar run` (pinned to core 0) on a redis-server of its own (core 1) takes batches of
`--batch` CloudEvents from a load generator in a process of its own (core 1, beside Redis) that
keeps `--concurrency` batches in flight for `--duration` seconds after a warm-up. Every record has
its own id, a `time`, and one of `--customers` customers (round robin, so a batch of 100 over 1000
customers is 100 script calls, over 1 customer one call). The policy gives the meter a day and a
month quota and billing (60 s windows to a closed port: the pusher runs, its pushes fail). It
prints records/s, batch latency, sidecar and Redis CPU per record, and checks that Redis counted
every accepted record once. Everything binds 127.0.0.1; every process is stopped at the end.

    python -m bench.records_in [--duration 10] [--batch 100] [--customers 1000 1] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from pathlib import Path
from typing import cast

import aiohttp
import redis

from bench.procs import Proc, free_port, pin_existing, stop_all
from bench.run import cpu_seconds
from sidecar.config.policy.windows import Period, calendar_window
from sidecar.http.events_api import BATCH
from sidecar.store.redis import keys
from sidecar.store.redis.embedded import EmbeddedRedis

SIDECAR_CORE, OTHER_CORE = 0, 1
WARMUP = 2.0
WARMUP_BATCHES = 20
READY_TIMEOUT = 20.0
HEADER = (
    "| customers | batch | in flight | records/s | batch ms p50 / p99 | sidecar CPU µs/record "
    "| Redis CPU µs/record | load generator CPU µs/record | counted once |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


@dataclass(frozen=True)
class Result:
    customers: int
    records: int
    seconds: float
    latencies: list[float]
    loadgen_cpu: float
    sidecar_cpu: float
    redis_cpu: float
    counted: int

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    def row(self, batch: int, concurrency: int) -> str:
        p50 = statistics.median(self.latencies) * 1000
        p99 = statistics.quantiles(self.latencies, n=100)[98] * 1000 if len(self.latencies) > 1 else p50
        per = 1e6 / self.records
        return (
            f"| {self.customers:,} | {batch} | {concurrency} | **{self.rate:,.0f}** | {p50:.1f} / {p99:.1f} "
            f"| {self.sidecar_cpu * per:.1f} | {self.redis_cpu * per:.1f} | {self.loadgen_cpu * per:.1f} "
            f"| {self.counted == self.records} |"
        )


def policy_text(customers: int, billing_port: int) -> str:
    names = "\n".join(f"  customer-{n}: {{plan: p}}" for n in range(customers))
    return (
        "version: 1\n"
        "meters: {gpu_seconds: {aggregation: sum, source: event}}\n"
        "plans:\n  p:\n    limits:\n"
        "      - {meter: gpu_seconds, limit: 1000000000000, period: day}\n"
        "      - {meter: gpu_seconds, limit: 1000000000000, period: month}\n"
        f"customers:\n{names}\n"
        f'billing: {{url: "http://127.0.0.1:{billing_port}/usage", format: json, interval: 60}}\n'
    )


def bodies(count: int, batch: int, customers: int, tag: str) -> list[bytes]:
    """``count`` batch bodies of ``batch`` records each, every record with an id of its own."""
    moment = datetime.now(UTC).isoformat()
    out = []
    for b in range(count):
        events = [
            {
                "specversion": "1.0",
                "id": f"{tag}-{b}-{i}",
                "source": "bench",
                "type": "gpu_seconds",
                "subject": f"customer-{(b * batch + i) % customers}",
                "time": moment,
                "data": {"value": 1, "host": "worker-7"},
            }
            for i in range(batch)
        ]
        out.append(json.dumps(events).encode())
    return out


async def drive(url: str, payloads: list[bytes], concurrency: int, seconds: float) -> tuple[int, list[float]]:
    """Keep ``concurrency`` batches in flight for ``seconds``: records accepted, batch latencies."""
    accepted, latencies, index = 0, [], 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": BATCH}) as session:

        async def worker() -> None:
            nonlocal accepted, index
            while time.monotonic() < deadline and index < len(payloads):
                body, index = payloads[index], index + 1
                started = time.perf_counter()
                async with session.post(url, data=body) as response:
                    answer = await response.json()
                latencies.append(time.perf_counter() - started)
                accepted += int(answer["accepted"])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return accepted, latencies


def loadgen(
    url: str, batch: int, customers: int, concurrency: int, seconds: float, out: Queue[object]
) -> None:
    """The load generator's process: a warm-up, then the measured run; (records, seconds,
    latencies, its own CPU seconds)."""
    pin_existing(multiprocessing.current_process().pid or 0, OTHER_CORE)
    estimate = int((seconds + WARMUP) * 60_000 / batch) + 10  # bodies for up to 60,000 records/s
    payloads = bodies(estimate, batch, customers, f"c{customers}")
    warm, _ = asyncio.run(drive(url, payloads[:WARMUP_BATCHES], concurrency, WARMUP))
    out.put(warm)
    started, cpu = time.perf_counter(), time.process_time()
    accepted, latencies = asyncio.run(drive(url, payloads[WARMUP_BATCHES:], concurrency, seconds))
    out.put((accepted, time.perf_counter() - started, latencies, time.process_time() - cpu))


def counted(store: redis.Redis, customers: int) -> int:
    """Records counted in Redis: the day quota counters of every customer (one unit a record)."""
    day = calendar_window(Period.DAY, time.time())[0]
    names = [keys.quota(f"customer-{n}", "gpu_seconds-day", day) for n in range(customers)]
    return sum(int(value or 0) for value in store.mget(names))


def measure(workdir: Path, customers: int, options: argparse.Namespace) -> Result:
    server = EmbeddedRedis(workdir / f"redis-{customers}", persistent=False)
    url = server.start()
    try:
        assert server.pid is not None
        pin_existing(server.pid, OTHER_CORE)
        return _with_sidecar(workdir, url, server.pid, customers, options)
    finally:
        server.stop()


def _with_sidecar(
    workdir: Path, url: str, redis_pid: int, customers: int, options: argparse.Namespace
) -> Result:
    policy = workdir / f"policy-{customers}.yaml"
    policy.write_text(policy_text(customers, free_port()))
    admin, listen = free_port(), free_port()
    argv = [
        sys.executable, "-m", "sidecar", "run", "--redis", url, "--policies", str(policy),
        "--admin", f"127.0.0.1:{admin}", "--listen", f"127.0.0.1:{listen}",
        "--upstream", "http://127.0.0.1:9", "--data-dir", str(workdir / f"data-{customers}"),
        "--store-timeout", "1",
    ]  # fmt: skip
    sidecar = Proc("sidecar", argv, core=SIDECAR_CORE, log=workdir / f"sidecar-{customers}.log")
    try:
        sidecar.wait_listening(admin, READY_TIMEOUT)
        return _run(sidecar, f"http://127.0.0.1:{admin}/admin/events", url, redis_pid, customers, options)
    finally:
        sidecar.stop()


def _run(
    sidecar: Proc, target: str, url: str, redis_pid: int, customers: int, options: argparse.Namespace
) -> Result:
    queue: Queue[object] = multiprocessing.get_context("spawn").Queue()
    args = (target, options.batch, customers, options.concurrency, options.duration, queue)
    generator = multiprocessing.get_context("spawn").Process(target=loadgen, args=args, daemon=True)
    generator.start()
    try:
        warm = cast(int, queue.get(timeout=120))  # the warm-up is over
        cpu = cpu_seconds(sidecar.pid), cpu_seconds(redis_pid)
        measured = cast(tuple[int, float, list[float], float], queue.get(timeout=options.duration + 60))
        used = cpu_seconds(sidecar.pid) - cpu[0], cpu_seconds(redis_pid) - cpu[1]
    finally:
        generator.join(timeout=10)
        if generator.is_alive():
            generator.kill()
    store = redis.Redis.from_url(url)
    total = counted(store, customers) - warm
    store.close()
    return Result(customers, *measured, used[0], used[1], total)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.records_in", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per row (10)")
    parser.add_argument("--batch", type=int, default=100, help="records a request (100)")
    parser.add_argument("--concurrency", type=int, default=8, help="batches in flight (8)")
    parser.add_argument("--customers", type=int, nargs="+", default=[1000, 1], help="customers (1000 1)")
    parser.add_argument("--quick", action="store_true", help="3 s rows, for a check")
    options = parser.parse_args(argv)
    if options.quick:
        options.duration = 3.0
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"load average when it started: {load} (2 cores; other work on the machine takes from both)\n")
    print(HEADER)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-records-in-") as workdir:
            for customers in options.customers:
                result = measure(Path(workdir), customers, options)
                print(result.row(options.batch, options.concurrency), flush=True)
    finally:
        stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
