"""A Python load generator for when wrk is absent: N keep-alive connections, each a closed loop of
GET requests (the next customer's key per request) for a fixed time, optionally waiting before each
request, so after each answer (`--pace 25-75`: a whole number of milliseconds drawn uniformly from
25 to 75, from one `random.Random(--seed)`, as bench.loadgen's wrk script does); prints
`BENCH_JSON {...}`.

It speaks just enough HTTP/1.1 over raw asyncio streams (Content-Length or chunked bodies) to stay
cheap, but it is still Python: on one core it may saturate before the proxy does, in which case
the ratios it reports understate the gap. wrk is preferred.

    python -m bench.pyload --url http://127.0.0.1:PORT/hello --keys keys.txt --connections 50 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from urllib.parse import urlsplit

from bench.loadgen import DEFAULT_SEED, parse_pace


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.non_2xx = 0
        self.socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
        return
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return
    raise ConnectionError("response without a length on a keep-alive connection")


class Pacer:
    """The wait before each request: whole milliseconds, uniform over [low, high]; none without a pace."""

    def __init__(self, pace: tuple[int, int] | None, seed: int) -> None:
        self.pace = pace
        self.random = random.Random(seed)

    async def wait(self) -> None:
        if self.pace is not None:
            await asyncio.sleep(self.random.randint(*self.pace) / 1000)


async def _connection(
    host: str, port: int, requests: itertools.cycle[bytes], stats: Stats, deadline: float, pacer: Pacer
) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        stats.socket_errors["connect"] += 1
        return
    try:
        while True:
            await pacer.wait()
            if time.monotonic() >= deadline:
                break
            started = time.perf_counter()
            try:
                writer.write(next(requests))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                await asyncio.wait_for(_read_body(reader, headers), 5)
            except TimeoutError:
                stats.socket_errors["timeout"] += 1
                return
            except (OSError, asyncio.IncompleteReadError, ValueError, ConnectionError):
                stats.socket_errors["read"] += 1
                return
            stats.latencies.append(time.perf_counter() - started)
            if not 200 <= status < 400:
                stats.non_2xx += 1
    finally:
        writer.close()


async def run(
    url: str,
    keys: list[str],
    connections: int,
    seconds: float,
    pace: tuple[int, int] | None = None,
    seed: int = DEFAULT_SEED,
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    requests = itertools.cycle(
        [f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nX-API-Key: {k}\r\n\r\n".encode() for k in keys]
    )
    stats = Stats()
    pacer = Pacer(pace, seed)
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(
        *(_connection(host, port, requests, stats, deadline, pacer) for _ in range(connections))
    )
    duration = time.monotonic() - started
    latencies = sorted(stats.latencies)

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e3 if latencies else 0.0

    return {
        "requests": len(latencies),
        "duration_s": duration,
        "p50_ms": percentile(50),
        "p90_ms": percentile(90),
        "p99_ms": percentile(99),
        "max_ms": latencies[-1] * 1e3 if latencies else 0.0,
        "mean_ms": sum(latencies) / len(latencies) * 1e3 if latencies else 0.0,
        "non_2xx": stats.non_2xx,
        "socket_errors": stats.socket_errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pyload")
    parser.add_argument("--url", required=True)
    parser.add_argument("--keys", required=True, help="file with one API key per line")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--pace", default=None, help="MIN-MAX ms, drawn uniformly, waited before each request (default: none)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="for the --pace draws")
    args = parser.parse_args()
    try:
        pace = None if args.pace is None else parse_pace(args.pace)
    except ValueError as error:
        parser.error(f"--pace: {error}")
    with open(args.keys) as file:
        keys = [line.strip() for line in file if line.strip()]
    seconds = min(args.seconds, 60.0)
    result = asyncio.run(run(args.url, keys, args.connections, seconds, pace, args.seed))
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
