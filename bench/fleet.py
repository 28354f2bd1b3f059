"""Customers at fleet scale (issue 13): two replicas on one Redis with a million imported customers.

It starts a redis-server, the demo upstream and two `sidecar run` replicas (A and B), all on
127.0.0.1, and measures, in one run:

* the import: `sidecar customers import FILE` of ``--customers`` NDJSON lines against A (wall time);
* Redis memory per customer (used_memory before and after the import, over the count);
* proxied p50/p99 on B with a random key of the million per request, at ``--rate`` requests a
  second (open loop), quiet, then while A takes ``--changes`` customer changes a second (PUTs of
  random customers, their plan flipped), with the PUTs' own latency;
* propagation: milliseconds until a new customer PUT on A is served on B (whose cache held its key
  as unknown), and until a DELETE on A is refused on B, ``--trials`` times each;
* each replica's resident memory (VmRSS, and VmHWM: its peak) at the end, after B has also
  served ``--fill`` distinct keys (more than its cache holds, so the cache is full).

Every process it starts is stopped on the way out; the whole run stops itself after ``--budget``
seconds. Run it when the machine is quiet:

    python -m bench.fleet [--customers 1000000] [--rate 100] [--seconds 15] [--changes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from bench import procs
from bench.run import cpu_seconds
from sidecar.store.redis.embedded import EmbeddedRedis

POLICY = """\
version: 1
meters:
  requests: {aggregation: count}
features:
  - {name: hello, match: {method: GET, path: /hello}}
plans:
  bench:
    features: [hello]
    limits:
      - {meter: requests, limit: 1000000000000, period: month}
      - {meter: requests, limit: 1000000000, period: second}
  bench2:
    features: [hello]
    limits:
      - {meter: requests, limit: 1000000000000, period: month}
"""
READY_TIMEOUT = 30.0
MiB = 1024 * 1024


def key(index: int) -> str:
    return f"fleet-key-{index}"


def write_fleet(path: Path, customers: int) -> None:
    """One customer a line: ``fleet-<i>`` on plan bench with key ``fleet-key-<i>`` (as its hash)."""
    with path.open("w") as out:
        for i in range(customers):
            digest = hashlib.sha256(key(i).encode()).hexdigest()
            out.write(f'{{"id": "fleet-{i}", "plan": "bench", "api_keys": ["sha256:{digest}"]}}\n')


@dataclass
class Replica:
    proc: procs.Proc
    port: int
    admin: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    def memory_mib(self) -> dict[str, float]:
        return {name: kib / 1024 for name, kib in self.proc.memory_kib().items()}


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    def add(self, status: int, took: float) -> None:
        self.seconds.append(took)
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.seconds)

        def at(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

        return {
            "n": len(ordered),
            "p50_ms": at(0.5),
            "p99_ms": at(0.99),
            "max_ms": at(1.0),
            "statuses": self.statuses,
        }


def start_replica(name: str, root: Path, redis_url: str, upstream: int, policy: Path) -> Replica:
    port, admin = procs.free_port(), procs.free_port()
    argv = [
        sys.executable, "-m", "sidecar", "run",
        "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
        "--upstream", f"http://127.0.0.1:{upstream}", "--policies", str(policy),
        "--redis", redis_url, "--data-dir", str(root / name), "--log-level", "WARNING",
    ]  # fmt: skip
    proc = procs.Proc(name, argv, core=None, log=root / f"{name}.log")
    proc.wait_listening(port, READY_TIMEOUT)
    proc.wait_listening(admin, READY_TIMEOUT)
    return Replica(proc, port, admin)


async def load(
    session: aiohttp.ClientSession, replica: Replica, customers: int, rate: float, seconds: float
) -> Latencies:
    """Open loop: one request every 1/rate s, each with a random key of the fleet."""
    found = Latencies()
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def one() -> None:
        headers = {"X-API-Key": key(random.randrange(customers))}
        began = time.perf_counter()
        async with session.get(f"{replica.url}/hello", headers=headers) as response:
            await response.read()
        found.add(response.status, time.perf_counter() - began)

    for n in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, started + n / rate - loop.time()))
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    return found


async def changes(
    session: aiohttp.ClientSession, replica: Replica, customers: int, rate: float, seconds: float
) -> Latencies:
    """``rate`` PUTs a second on random customers of the fleet, each flipping its plan."""
    found = Latencies()
    loop = asyncio.get_running_loop()
    started = loop.time()
    for n in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, started + n / rate - loop.time()))
        i = random.randrange(customers)
        digest = hashlib.sha256(key(i).encode()).hexdigest()
        body = {"plan": random.choice(["bench", "bench2"]), "api_keys": [f"sha256:{digest}"]}
        began = time.perf_counter()
        async with session.put(f"{replica.admin_url}/admin/customers/fleet-{i}", json=body) as response:
            await response.read()
        found.add(response.status, time.perf_counter() - began)
    return found


async def status_of(session: aiohttp.ClientSession, replica: Replica, api_key: str) -> int:
    async with session.get(f"{replica.url}/hello", headers={"X-API-Key": api_key}) as response:
        await response.read()
        return response.status


async def until(
    session: aiohttp.ClientSession, replica: Replica, api_key: str, status: int, began: float
) -> float:
    """Milliseconds from ``began`` until ``replica`` answers ``status`` for the key (polled each ms)."""
    while await status_of(session, replica, api_key) != status:
        if time.perf_counter() - began > 5:
            raise RuntimeError(f"{api_key} never answered {status} on {replica.proc.name}")
        await asyncio.sleep(0.001)
    return (time.perf_counter() - began) * 1000


async def propagation(
    session: aiohttp.ClientSession, a: Replica, b: Replica, trials: int
) -> dict[str, list[float]]:
    """A new customer PUT on A until B serves it (B held its key as unknown), then a DELETE on A
    until B refuses it."""
    found: dict[str, list[float]] = {"change": [], "delete": []}
    for n in range(trials):
        api_key = f"prop-key-{n}"
        assert await status_of(session, b, api_key) == 401
        body = {"plan": "bench", "api_keys": ["sha256:" + hashlib.sha256(api_key.encode()).hexdigest()]}
        began = time.perf_counter()
        async with session.put(f"{a.admin_url}/admin/customers/prop-{n}", json=body) as response:
            assert response.status == 200, await response.text()
        found["change"].append(await until(session, b, api_key, 200, began))
        began = time.perf_counter()
        async with session.delete(f"{a.admin_url}/admin/customers/prop-{n}") as response:
            assert response.status == 200, await response.text()
        found["delete"].append(await until(session, b, api_key, 401, began))
        await asyncio.sleep(0.05)
    return found


def import_cpu(plain: redis.Redis, a: Replica, b: Replica) -> dict[str, float]:
    """CPU seconds so far of replica A (which takes the import), B, redis-server and this
    process's children that have ended (the `sidecar customers import` client)."""
    info = plain.info("cpu")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "replica_a": cpu_seconds(a.proc.pid),
        "replica_b": cpu_seconds(b.proc.pid),
        "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        "cli": children.ru_utime + children.ru_stime,
    }


def import_fleet(path: Path, a: Replica) -> tuple[float, str]:
    began = time.perf_counter()
    argv = [
        sys.executable,
        "-m",
        "sidecar",
        "customers",
        "import",
        str(path),
        "--admin",
        f"127.0.0.1:{a.admin}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=procs.child_env())
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"import failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")
    return took, done.stdout.strip()


async def measure(args: argparse.Namespace, a: Replica, b: Replica) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=200)) as session:
        await load(session, b, args.customers, args.rate, 2)  # warm up connections
        quiet = await load(session, b, args.customers, args.rate, args.seconds)
        busy, changed = await asyncio.gather(
            load(session, b, args.customers, args.rate, args.seconds),
            changes(session, a, args.customers, args.changes, args.seconds),
        )
        spread = await propagation(session, a, b, args.trials)
        filled = await fill(session, b, args.fill)
    return {
        "quiet": quiet.summary(),
        "busy": busy.summary(),
        "puts": changed.summary(),
        "propagation": spread,
        "fill": filled.summary(),
    }


async def fill(session: aiohttp.ClientSession, replica: Replica, count: int) -> Latencies:
    """``count`` distinct keys of the fleet through ``replica``, 16 at a time (fills its cache)."""
    found = Latencies()
    keys = iter(range(count))

    async def worker() -> None:
        for i in keys:
            began = time.perf_counter()
            async with session.get(f"{replica.url}/hello", headers={"X-API-Key": key(i)}) as response:
                await response.read()
            found.add(response.status, time.perf_counter() - began)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(16))), timeout=300)
    return found


def report(args: argparse.Namespace, figures: dict[str, Any]) -> str:
    took = figures["import_s"]
    lines = [
        f"customers {args.customers:,}; load {args.rate:g} req/s on B for {args.seconds:g} s; "
        f"{args.changes:g} changes/s on A",
        f"import: {took:.1f} s ({args.customers / took:,.0f} lines/s): {figures['import_out']}",
        f"redis: {figures['redis_bytes_per_customer']:.0f} bytes per customer "
        f"(used_memory {figures['redis_used_mib']:.0f} MiB, {figures['redis_keys']:,} keys)",
    ]
    for name in ("quiet", "busy", "puts", "fill"):
        row = figures[name]
        lines.append(
            f"{name}: n={row['n']:,} p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms "
            f"max {row['max_ms']:.2f} ms {row['statuses']}"
        )
    for name, found in figures["propagation"].items():
        median, worst = statistics.median(found), max(found)
        lines.append(f"propagation {name}: median {median:.1f} ms, max {worst:.1f} ms over {len(found)}")
    cpu = ", ".join(f"{name} {us:.1f}" for name, us in figures["import_cpu_us_per_customer"].items())
    lines.append(f"import CPU, µs per customer: {cpu}")
    for name in ("rss_a_import", "rss_a", "rss_b"):
        memory = figures[name]
        rss, peak = memory.get("VmRSS", 0), memory.get("VmHWM", 0)
        lines.append(f"{name}: VmRSS {rss:.0f} MiB, VmHWM {peak:.0f} MiB")
    return "\n".join(lines)


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    server = EmbeddedRedis(root / "redis", persistent=False)
    url = server.start()
    try:
        policy = root / "fleet.yaml"
        policy.write_text(POLICY)
        fleet = root / "fleet.ndjson"
        write_fleet(fleet, args.customers)
        upstream_port = procs.free_port()
        upstream = procs.Proc(
            "upstream",
            [sys.executable, "-m", "bench.upstream", "--listen", f"127.0.0.1:{upstream_port}"],
            core=None,
            log=root / "upstream.log",
        )
        upstream.wait_listening(upstream_port, READY_TIMEOUT)
        a = start_replica("replica-a", root, url, upstream_port, policy)
        b = start_replica("replica-b", root, url, upstream_port, policy)
        plain = redis.Redis.from_url(url)
        before = int(plain.info("memory")["used_memory"])
        cpu_before = import_cpu(plain, a, b)
        took, out = import_fleet(fleet, a)
        cpu = {
            name: (after - cpu_before[name]) / args.customers * 1e6
            for name, after in import_cpu(plain, a, b).items()
        }
        used = int(plain.info("memory")["used_memory"])
        figures: dict[str, Any] = {"import_s": took, "import_out": out, "rss_a_import": a.memory_mib()}
        figures["import_cpu_us_per_customer"] = cpu
        figures |= {
            "redis_bytes_per_customer": (used - before) / args.customers,
            "redis_used_mib": used / MiB,
            "redis_keys": int(plain.dbsize()),
        }
        figures |= asyncio.run(measure(args, a, b))
        figures |= {"rss_a": a.memory_mib(), "rss_b": b.memory_mib()}
        plain.close()
        return figures
    finally:
        procs.stop_all()
        server.stop()


def _over_budget(signum: int, frame: object) -> None:
    raise TimeoutError("the fleet bench ran over its --budget")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=100.0, help="proxied requests a second on B")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each load phase")
    parser.add_argument("--changes", type=float, default=20.0, help="customer changes a second on A")
    parser.add_argument("--trials", type=int, default=20, help="propagation measurements of each kind")
    parser.add_argument("--fill", type=int, default=110_000, help="distinct keys sent to B at the end")
    parser.add_argument("--budget", type=int, default=900, help="seconds before the whole run stops itself")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGALRM, _over_budget)
    signal.alarm(args.budget)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as root:
            figures = run(args, Path(root))
    finally:
        signal.alarm(0)
    print(report(args, figures))
    print(json.dumps(figures, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
