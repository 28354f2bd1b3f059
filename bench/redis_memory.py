"""Redis memory per key and per customer, on the real store (deploy/README.md, "Sizing").

A redis-server of its own on a free 127.0.0.1 port (sidecar.store.redis.embedded; its append-only
file on, as deployed, with automatic rewrites off for the run) and the sidecar's store
(RedisStore) driven as `sidecar run` drives it, for `--customers` customers of a small policy
written to a temporary directory: one calendar quota (a month), one moving window (a minute,
on feature `hello`), two meters (`requests`, count; `units`, sum) and billing windows of 10 s.
Step by step, for every customer:

  A  one request to `hello`: the quota's counter, the moving window with one entry, the usage
     hash with one field (requests|hello), the connection's call record, the DIRTY schedule;
  B  one request to `search`, which adds two meter x feature fields to the usage hash
     (requests|search, units|search);
  C  a second request to `hello`: a second entry in the moving window;
  D  its billing window closed into the outbox once the window and its grace have passed, as
     billing/pusher.py closes it: three summaries, their revisions, their usage history (kept
     history_days, 35 by default), the PENDING schedule (nothing is pushed: the billing URL
     answers nothing);
  E  stored through the store port (`store.customers.put_many`, 100 a call), one API key each;
  F  what the revisions and the usage history keep for a customer billed over many windows:
     for `--long` customers of their own, 1,440 past billing windows' usage (one field each,
     written in lib.lua's format, since waiting out 1,440 windows is not bounded), closed by the
     real close script 60 windows at a time and settled as delivered; their outboxes are empty
     again, their revisions and history remain.

After each step, once used_memory has settled (the connections' buffers of a burst of calls are
given back within a second or so), it reads `INFO memory` used_memory and `INFO persistence`
aof_current_size (the change per customer of the step against the step before), and
`MEMORY USAGE <key> SAMPLES 0` of every key, grouped by kind. Bounded: at most 20,000
customers, 1,000 in step F, and `--budget` seconds (the waits for a billing window take up to
20 s); the server is stopped on the way out. Nothing here changes the sidecar.

    python -m bench.redis_memory [--customers 2000] [--long 200] [--budget 180] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar, cast

import redis

from bench.procs import free_port
from sidecar.admission import gate
from sidecar.admission.plan import meter_request
from sidecar.billing.marks import DirtyMarks
from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.model import Customer, Policy
from sidecar.config.policy.windows import billing_window
from sidecar.store.port import Outcome, Written
from sidecar.store.redis import keys
from sidecar.store.redis.embedded import EmbeddedRedis
from sidecar.store.redis.store import RedisStore

T = TypeVar("T")
STORE_TIMEOUT = 2.0  # generous: this measures memory, not latency
MAX_CUSTOMERS = 20_000
WARM_CUSTOMERS = 200  # a pass over these first loads the scripts and opens the connections
CONCURRENT = 200  # calls in flight at once
PUT_BATCH = 100  # customers per put_many call, as an import sends them
INTERVAL = 10  # billing window, seconds
GRACE = 1
FRESH_WINDOW = 8.0  # steps A-C start with at least this many seconds left in their billing window
PAST_WINDOWS = 1440  # step F: billing windows closed for each of its customers (a day of 60 s ones)
ROUND_WINDOWS = 60  # step F: windows closed at a time
LONG_PREFIX = "active-"  # step F's customers, told apart in the census
SETTLE_SECONDS = 5.0  # the longest wait for used_memory to settle after a step
PLAN = "free"

POLICY = f"""\
version: 1
meters:
  requests: {{aggregation: count}}
  units:    {{aggregation: sum}}
features:
  - {{name: hello,  match: {{method: GET, path: /hello}}}}
  - {{name: search, match: {{method: GET, path: /search}}, cost: {{units: 3}}}}
plans:
  {PLAN}:
    features: [hello, search]
    limits:
      - {{meter: requests, limit: 1000000, period: month}}
      - {{meter: requests, limit: 1000, period: minute, feature: hello}}
billing:
  url: http://127.0.0.1:9/usage
  format: json
  interval: {INTERVAL}
  grace: {GRACE}
"""

STEPS = {
    "A": "one request to hello: a month quota, a moving window (1 entry), 1 usage field",
    "B": "one request to search: 2 more meter x feature fields in the usage hash",
    "C": "a second request to hello: a 2nd entry in the moving window",
    "D": "billing window closed into the outbox: 3 summaries, and their history",
    "E": "stored through store.customers.put_many, 1 API key",
    "F": f"{PAST_WINDOWS} windows closed and delivered, for customers of their own",
}
# What follows the kind in a per-customer key's name (store/redis/keys.py).
_TAILS = {
    "q": ":<limit>:<window start>",
    "rl": ":<limit>",
    "rt": ":<limit>",
    "calls": ":<token>",
    "hh": ":<hour start>",
    "hd": ":<day start>",
}


@dataclass
class Kind:
    """The keys of one kind at one step."""

    keys: int
    total: int  # bytes, MEMORY USAGE summed
    median: float
    least: int
    most: int
    encoding: str
    elements: float | None  # median HLEN/LLEN/ZCARD/SCARD/XLEN; None for strings
    ttl: float | None  # median seconds left; None when the keys do not expire


@dataclass
class Step:
    name: str
    what: str
    customers: int
    used_memory: int
    used_memory_delta: int
    aof_delta: int
    clients: int
    clients_memory_delta: int
    kinds: dict[str, Kind]


def kind_of(key: str) -> str:
    """The key's name with the customer, limit, window, token or hash in it left out."""
    tag = f"{keys.PREFIX}:{{c:"
    if key.startswith(tag):
        rest = key[key.index("}:") + 2 :]
        head = rest.partition(":")[0]
        who = f"{LONG_PREFIX}<id>" if key.startswith(tag + LONG_PREFIX) else "<id>"
        return f"{tag}{who}}}:{head}{_TAILS.get(head, ':…' if ':' in rest else '')}"
    if key.startswith(keys.KEY_OWNER_PREFIX):
        return f"{keys.KEY_OWNER_PREFIX}<key hash>"
    if key.startswith(f"{keys.PREFIX}:{{ix:"):
        return f"{keys.PREFIX}:{{ix:<bucket>}}:ids"
    return key


def census(client: redis.Redis) -> dict[str, Kind]:
    """Every key's MEMORY USAGE (all elements sampled), encoding, length and TTL, by kind."""
    names = [cast(bytes, name) for name in client.scan_iter(count=1000)]
    rows: dict[str, list[tuple[int, str, int | None, float | None]]] = {}
    for start in range(0, len(names), 500):
        chunk = names[start : start + 500]
        pipe = client.pipeline(transaction=False)
        for name in chunk:
            pipe.memory_usage(name, samples=0)
            pipe.type(name)
            pipe.object("encoding", name)
            pipe.pttl(name)
        replies = pipe.execute()
        pipe = client.pipeline(transaction=False)
        length = {
            "hash": pipe.hlen,
            "list": pipe.llen,
            "zset": pipe.zcard,
            "set": pipe.scard,
            "stream": pipe.xlen,
        }
        counted = []
        for i, name in enumerate(chunk):
            command = length.get(replies[4 * i + 1].decode())
            if command:
                command(name)
                counted.append(i)
        lengths = dict(zip(counted, pipe.execute(), strict=True))
        for i, name in enumerate(chunk):
            usage, encoding, pttl = replies[4 * i], replies[4 * i + 2], replies[4 * i + 3]
            ttl = None if pttl < 0 else pttl / 1000
            row = (int(usage), encoding.decode(), lengths.get(i), ttl)
            rows.setdefault(kind_of(name.decode()), []).append(row)
    found = {}
    for kind, items in sorted(rows.items()):
        sizes = [item[0] for item in items]
        elements = [item[2] for item in items if item[2] is not None]
        ttls = [item[3] for item in items if item[3] is not None]
        found[kind] = Kind(
            keys=len(items),
            total=sum(sizes),
            median=statistics.median(sizes),
            least=min(sizes),
            most=max(sizes),
            encoding="/".join(sorted({item[1] for item in items})),
            elements=statistics.median(elements) if elements else None,
            ttl=statistics.median(ttls) if ttls else None,
        )
    return found


def settled(client: redis.Redis) -> dict[str, int]:
    """`info` once used_memory has stayed put for half a second (or after SETTLE_SECONDS)."""
    last = info(client)
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = info(client)
        if now["used_memory"] == last["used_memory"]:
            return now
        last = now
    return last


def info(client: redis.Redis) -> dict[str, int]:
    memory = client.info("memory")
    persistence = client.info("persistence")
    clients = client.info("clients")
    return {
        "used_memory": int(memory["used_memory"]),
        "clients_memory": int(memory.get("mem_clients_normal", 0)),
        "aof": int(persistence.get("aof_current_size", 0)),
        "clients": int(clients["connected_clients"]),
    }


async def each(items: Sequence[T], call: Callable[[T], Awaitable[object]]) -> None:
    for start in range(0, len(items), CONCURRENT):
        await asyncio.gather(*(call(item) for item in items[start : start + CONCURRENT]))


class Driver:
    """The store calls of each step, as the sidecar makes them."""

    def __init__(self, store: RedisStore, policy: Policy) -> None:
        self.store = store
        self.policy = policy
        assert policy.billing is not None
        self.billing = policy.billing
        self.marks = DirtyMarks()
        self.aggregations = {name: meter.aggregation.value for name, meter in policy.meters.items()}

    async def request(self, customer: Customer, feature: str) -> None:
        spec = self.policy.charges[(customer.plan, feature)]
        admission = await gate.at_store_time(
            self.store,
            self.store.check_and_meter,
            lambda now: meter_request(self.policy, customer, feature, spec, now),
        )
        if admission.outcome is not Outcome.ADMITTED:
            raise RuntimeError(f"{customer.id} {feature}: {admission.outcome}")
        self.marks.note(customer.id, admission.store_time, self.billing)  # as proxy.py notes usage

    async def requests(self, customers: Sequence[Customer], feature: str) -> None:
        await each(customers, lambda customer: self.request(customer, feature))
        await self.store.outbox.mark_dirty(self.marks.take())  # the pusher's next cycle

    async def close(self, count: int, *, ahead: int = 0) -> int:
        """billing/pusher.py's close pass over every due customer; the summaries moved. With
        `ahead` (the warm-up only) it closes as if that many seconds had passed."""
        now_ms = int(self.store.time() * 1000) + ahead * 1000
        cutoff = now_ms // 1000 - self.billing.grace
        due = await self.store.outbox.due_dirty(now_ms, count)
        moved_in_all = 0

        async def close_one(due_customer: tuple[str, int]) -> None:
            nonlocal moved_in_all
            customer, seen = due_customer
            moved, open_window = await self.store.outbox.close(
                customer,
                PLAN,
                self.billing.interval,
                cutoff,
                self.aggregations,
                namespace=self.billing.namespace,
                history_days=self.policy.history_days,
            )
            if moved > 0:
                moved_in_all += moved
                await self.store.outbox.schedule_push(customer, now_ms)
            again = (
                None
                if open_window is None
                else (open_window + self.billing.interval + self.billing.grace) * 1000
            )
            await self.store.outbox.reschedule(keys.DIRTY, customer, seen, again)

        await each(due, close_one)
        return moved_in_all

    async def past_windows(self, customers: Sequence[Customer], windows: int, plain: redis.Redis) -> None:
        """Step F: each customer's usage in `windows` past billing windows (one request to hello in
        each, as lib.lua record_usage writes it), closed and settled as delivered, ROUND_WINDOWS
        windows at a time (a pusher closes every few windows, not a day's at once)."""
        first = billing_window(self.store.time(), self.billing.interval)[0] - windows * self.billing.interval
        for done in range(0, windows, ROUND_WINDOWS):
            starts = [
                first + k * self.billing.interval for k in range(done, min(windows, done + ROUND_WINDOWS))
            ]
            for customer in customers:
                items = [part for start in starts for part in (f"{start}|requests|hello", 1)]
                plain.hset(keys.usage(customer.id), items=items)
            now_ms = int(self.store.time() * 1000)
            await self.store.outbox.mark_dirty({customer.id: now_ms for customer in customers})
            moved = await self.close(len(customers))
            if moved != len(starts) * len(customers):
                raise RuntimeError(f"step F closed {moved} summaries, not {len(starts) * len(customers)}")
            await each(customers, lambda customer: self.delivered(customer, plain))

    async def delivered(self, customer: Customer, plain: redis.Redis) -> None:
        """Settle every summary of the customer's outbox as billing/pusher.py does after a 2xx."""
        summaries = await self.store.outbox.summaries(customer.id)
        if await self.store.outbox.settle(customer.id, tuple(s.id for s in summaries)):
            raise RuntimeError(f"{customer.id}: summaries left after settling")
        seen = plain.zscore(keys.PENDING, customer.id)
        if seen is not None:
            await self.store.outbox.reschedule(keys.PENDING, customer.id, int(seen), None)

    async def put(self, customers: Sequence[Customer]) -> None:
        for start in range(0, len(customers), PUT_BATCH):
            results = await self.store.customers.put_many(customers[start : start + PUT_BATCH])
            refused = [r for r in results if r.outcome is not Written.STORED]
            if refused:
                raise RuntimeError(f"put_many: {refused[:3]}")


def customers_named(prefix: str, count: int) -> list[Customer]:
    return [
        Customer(
            id=f"{prefix}{i:06d}",
            plan=PLAN,
            api_key_hashes=(hashlib.sha256(f"{prefix}key-{i}".encode()).hexdigest(),),
        )
        for i in range(count)
    ]


async def until(store: RedisStore, at: float) -> None:
    """Sleep until the store's clock reads `at`."""
    while (left := at - store.time()) > 0:
        await asyncio.sleep(min(left + 0.01, 1.0))
        await store.ping()


async def measure(url: str, policy_path: Path, count: int, long: int) -> list[Step]:
    policy = load_policy(str(policy_path))
    plain = redis.Redis.from_url(url)
    store = RedisStore.open(url, STORE_TIMEOUT)
    try:
        await store.ping()
        plain.config_set("auto-aof-rewrite-percentage", 0)  # the AOF's growth, not a rewrite's
        driver = Driver(store, policy)

        # Warm-up: every script loaded, every connection the steps use opened; then nothing kept.
        warm = customers_named("warm-", WARM_CUSTOMERS)
        for feature in ("hello", "search", "hello"):
            await driver.requests(warm, feature)
        await driver.close(WARM_CUSTOMERS, ahead=2 * INTERVAL)
        await driver.put(warm)
        plain.flushall()

        customers = customers_named("customer-", count)
        window_end = billing_window(store.time(), INTERVAL)[1]
        if window_end - store.time() < FRESH_WINDOW:  # steps A-C in one billing window
            await until(store, window_end + 0.05)
            window_end += INTERVAL
        before = settled(plain)
        steps: list[Step] = []

        def step(name: str, customers: int = count) -> None:
            nonlocal before
            now = settled(plain)
            steps.append(
                Step(
                    name=name,
                    what=STEPS[name],
                    customers=customers,
                    used_memory=now["used_memory"],
                    used_memory_delta=now["used_memory"] - before["used_memory"],
                    aof_delta=now["aof"] - before["aof"],
                    clients=now["clients"],
                    clients_memory_delta=now["clients_memory"] - before["clients_memory"],
                    kinds=census(plain),
                )
            )
            before = settled(plain)  # the census's own traffic left out of the next step

        steps.append(
            Step("-", "empty, after the warm-up", 0, before["used_memory"], 0, 0, before["clients"], 0, {})
        )
        await driver.requests(customers, "hello")
        step("A")
        await driver.requests(customers, "search")
        step("B")
        await driver.requests(customers, "hello")
        if store.time() >= window_end:
            raise RuntimeError("steps A-C crossed a billing window: run with fewer --customers")
        step("C")
        await until(store, window_end + GRACE + 0.2)
        moved = await driver.close(count)
        if moved != 3 * count:
            raise RuntimeError(f"the close moved {moved} summaries, not {3 * count}")
        step("D")
        await driver.put(customers)
        step("E")
        await driver.past_windows(customers_named(LONG_PREFIX, long), PAST_WINDOWS, plain)
        step("F", long)
        return steps
    finally:
        await store.close()
        plain.close()


def machine(server: str, allocator: str) -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"`nproc` {os.cpu_count()}, {model}, Linux {platform.release()}, Python {platform.python_version()}, "
        f"redis-py {redis.__version__}, redis-server {server} (malloc={allocator})"
    )


def report(steps: list[Step], count: int, where: str) -> str:
    lines = [
        f"{count:,} customers; {where}.",
        "",
        "| step | what | customers | used_memory Δ | per customer | AOF Δ per customer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in steps[1:]:
        lines.append(
            f"| {s.name} | {s.what} | {s.customers:,} | {s.used_memory_delta:,} "
            f"| {s.used_memory_delta / s.customers:,.0f} | {s.aof_delta / s.customers:,.0f} |"
        )
    lines += [
        "",
        f"used_memory empty: {steps[0].used_memory:,} B; connected clients "
        + ", ".join(f"{s.name} {s.clients}" for s in steps)
        + "; client buffers Δ "
        + ", ".join(f"{s.name} {s.clients_memory_delta:+,}" for s in steps[1:]),
        "",
        "| key kind | step | keys | bytes a key (median) | least-most | per customer | encoding | elements "
        "| TTL s |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    long = steps[-1].customers

    def per(kind: str) -> int:
        """Step F's keys are its customers'; every other kind is the main customers'."""
        return long if kind.startswith(f"{keys.PREFIX}:{{c:{LONG_PREFIX}") else count

    seen: dict[str, Kind] = {}
    for s in steps[1:]:
        for kind, k in s.kinds.items():
            if seen.get(kind) == k or (kind in seen and _same_but_ttl(seen[kind], k)):
                continue
            seen[kind] = k
            elements = "" if k.elements is None else f"{k.elements:g}"
            ttl = "none" if k.ttl is None else f"{k.ttl:,.0f}"
            lines.append(
                f"| `{kind}` | {s.name} | {k.keys:,} | {k.median:,.0f} | {k.least:,}-{k.most:,} "
                f"| {k.total / per(kind):,.1f} | {k.encoding} | {elements} | {ttl} |"
            )
        for kind in [kind for kind in seen if kind not in s.kinds]:
            lines.append(f"| `{kind}` | {s.name} | gone | | | | | | |")
            del seen[kind]
    return "\n".join(lines)


def _same_but_ttl(a: Kind, b: Kind) -> bool:
    return (a.keys, a.total, a.encoding, a.elements) == (b.keys, b.total, b.encoding, b.elements)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_memory")
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--long", type=int, default=200, help="step F's customers")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds before the run gives up")
    parser.add_argument("--json", action="store_true", help="also print the figures as BENCH_JSON")
    args = parser.parse_args()
    count = max(10, min(args.customers, MAX_CUSTOMERS))
    long = max(1, min(args.long, 1000))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="bench-redis-memory-") as directory:
        policy_path = Path(directory) / "policy.yaml"
        policy_path.write_text(POLICY)
        server = EmbeddedRedis(Path(directory) / "redis", persistent=True, port=free_port())
        try:
            url = server.start()
            plain = redis.Redis.from_url(url)
            described = plain.info("server")
            allocator = str(plain.info("memory").get("mem_allocator", "?"))
            plain.close()
            steps = asyncio.run(asyncio.wait_for(measure(url, policy_path, count, long), args.budget))
        finally:
            server.stop()
    where = f"run {started}; {machine(str(described['redis_version']), allocator)}"
    print(report(steps, count, where))
    if args.json:
        figures = {"customers": count, "steps": [asdict(s) for s in steps]}
        print("BENCH_JSON " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
