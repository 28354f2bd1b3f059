"""`python -m bench.soak`: a bounded soak with chaos (issue 6, part 5).

Everything binds 127.0.0.1 and stops by itself. It starts a real redis-server with an append-only
file, the demo upstream (bench.upstream), a billing receiver that deduplicates on the summary id
as a real billing system would, and two `sidecar run` processes, A and B, sharing that Redis.
bench.soakload drives both at high concurrency for `--duration` seconds (180 by default,
`--quick` is 24). Meanwhile:

* Redis is restarted: stopped with SIGTERM, which makes it write and fsync its append-only file
  before it exits (what `SHUTDOWN` does with AOF on), kept down a few seconds, then started again
  on the same port and data directory. Nothing acknowledged is lost, so every admitted unit must
  still be there. Plans with `store_failure: open` admit through the journal while it is down;
  the `closed` ones answer 503.
* A is SIGKILLed, and a few seconds later started again on the same ports and data directory, as
  a supervisor would: a journal segment it left is merged only by a process on its data directory.
  B must keep serving throughout; connections that A refuses go to B, as a load balancer would.

The resident memory of both sidecars is sampled every second. At the end, once billing has
caught up with the counters, both sidecars get SIGTERM (they push every ended window). Three
totals are compared per customer: the units the clients were answered 2xx for, the units billed
(summaries deduplicated by id), and the store's counters (the admin usage API). A request that was
written and whose answer never came (A died with it in flight) may or may not have been metered:
the client cannot know, so such units are counted apart, and billed - admitted must lie between 0
and them.

The report is printed, and with `--write PATH` written as Markdown (SOAK.md). The exit code is 1
when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import redis
from aiohttp import web

from bench.procs import Proc, free_port, stop_all
from bench.soakreport import Outcomes, Report, problems, render
from sidecar.admission.identity import hash_key
from sidecar.store.redis.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 20.0
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2)
SAMPLE_EVERY = 1.0  # seconds between memory samples
PAUSE_SECONDS = 10.0  # longer than the stop takes: the pause ends with the process
PLANS = {"open": "open", "closed": "closed", "throttled": "closed"}  # plan → store_failure
CUSTOMERS = {
    **{f"open-{i}": "open" for i in range(4)},
    **{f"closed-{i}": "closed" for i in range(3)},
    "throttled-0": "throttled",
}
THROTTLE_PER_SECOND = 20
COSTS = {"search": 1, "export": 5}  # units per request; `export` has `cost` in the policy
# Four searches for each export, each round of customers in turn.
MIX = [{"feature": "search", "method": "GET", "path": "/v1/search", "cost": COSTS["search"]}] * 4 + [
    {"feature": "export", "method": "POST", "path": "/v1/exports/7", "cost": COSTS["export"]}
]


@dataclass(frozen=True)
class Config:
    duration: float = 180.0  # seconds of load
    connections: int = 128
    redis_stop_at: float = 0.3  # fraction of the duration
    redis_down: float = 3.0  # seconds Redis stays stopped
    kill_at: float = 0.55  # fraction of the duration
    kill_down: float = 5.0  # seconds before the killed sidecar is started again
    store_timeout: float = 0.05  # the sidecar's default
    interval: int = 2  # billing window, seconds
    grace: int = 1
    drain_timeout: float = 50.0  # for billing to catch up: a dead replica's lease is 30 s
    memory_window: float = 60.0  # seconds at the start and at the end whose peaks are compared
    pause_before_stop: bool = False  # CLIENT PAUSE ALL before the SIGTERM: no reply is left unsent


QUICK = Config(
    duration=24.0, connections=64, redis_stop_at=0.25, redis_down=2.0, kill_at=0.5, kill_down=3.0,
    drain_timeout=30.0, memory_window=8.0,
)  # fmt: skip


def bench_module(module: str) -> list[str]:
    """argv running a module of this package from any working directory (`env` execs, so the
    pid is Python's own)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return ["env", f"PYTHONPATH={path}", sys.executable, "-m", module]


def api_key(customer: str) -> str:
    return f"soak-key-{customer}"


def policy_text(billing_url: str, config: Config) -> str:
    """Every plan has a month quota far out of reach (so the store's counter is the units metered);
    `throttled` also has a per-second rate limit, for refusals."""
    month = "{meter: requests, limit: 1000000000, period: month}"
    rate = f"{{meter: requests, limit: {THROTTLE_PER_SECOND}, period: second}}"
    plans = "".join(
        f"  {plan}:\n    features: [search, export]\n    store_failure: {failure}\n"
        f"    limits: [{month}{', ' + rate if plan == 'throttled' else ''}]\n"
        for plan, failure in PLANS.items()
    )
    customers = "".join(
        f'  {name}: {{plan: {plan}, api_keys: ["sha256:{hash_key(api_key(name))}"]}}\n'
        for name, plan in CUSTOMERS.items()
    )
    return (
        "version: 1\nmeters: {requests: {aggregation: count}}\nfeatures:\n"
        "  - {name: search, match: {method: GET, path: /v1/search}}\n"
        f'  - {{name: export, match: {{method: POST, path: "/v1/exports/{{id}}"}}, '
        f"cost: {{requests: {COSTS['export']}}}}}\n"
        f"plans:\n{plans}customers:\n{customers}"
        f'billing: {{url: "{billing_url}", format: json, '
        f"interval: {config.interval}, grace: {config.grace}}}\n"
    )


@dataclass
class Receiver:
    """A `json`-format billing endpoint. Like a real billing system it keeps the first value of each
    summary id; a resend (same id) is counted as a duplicate, and a resend with another value as a
    conflict (which must never happen)."""

    first: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # id → customer, meter, value
    deliveries: int = 0
    posts: int = 0
    conflicts: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        for summary in (await request.json())["summaries"]:
            self.deliveries += 1
            seen = (str(summary["customer"]), str(summary["meter"]), int(summary["value"]))
            if self.first.setdefault(str(summary["id"]), seen) != seen:
                self.conflicts.append(f"{summary['id']}: {self.first[str(summary['id'])]} then {seen}")
        return web.json_response({"ok": True})

    def totals(self) -> dict[str, int]:
        """Units billed per customer, over unique ids."""
        totals: dict[str, int] = {}
        for customer, _meter, value in self.first.values():
            totals[customer] = totals.get(customer, 0) + value
        return totals


async def serve_receiver(stack: contextlib.AsyncExitStack) -> tuple[Receiver, str]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/usage", receiver.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return receiver, f"http://127.0.0.1:{port}/usage"


@dataclass
class SidecarSpec:
    """How to start one `sidecar run` (again, after a SIGKILL: same ports, same data directory)."""

    name: str
    proxy_port: int
    admin_port: int
    argv: list[str]
    log: Path

    def start(self) -> Proc:
        return Proc(self.name, self.argv, core=None, log=self.log)

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def sidecar_spec(
    name: str, workdir: Path, policy: Path, upstream: str, redis_url: str, config: Config
) -> SidecarSpec:
    proxy, admin = free_port(), free_port()
    argv = [
        sys.executable, "-m", "sidecar", "run",
        "--listen", f"127.0.0.1:{proxy}", "--admin", f"127.0.0.1:{admin}", "--upstream", upstream,
        "--policies", str(policy), "--data-dir", str(workdir / f"data-{name}"), "--redis", redis_url,
        "--store-timeout", str(config.store_timeout), "--log-level", "WARNING",
    ]  # fmt: skip
    return SidecarSpec(name, proxy, admin, argv, workdir / f"sidecar-{name}.log")


async def wait_ready(session: aiohttp.ClientSession, proc: Proc, admin: str) -> float:
    """Wall clock when /readyz first answered 200; raises if the process exits or time runs out."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited: {proc.log_tail()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{admin}/readyz", timeout=PROBE_TIMEOUT) as probe:
                if probe.status == 200:
                    return time.time()
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready within {READY_TIMEOUT:.0f}s: {proc.log_tail()}")


@dataclass
class Fleet:
    """The running processes and what happened to them, in wall-clock time."""

    redis: EmbeddedRedis
    specs: dict[str, SidecarSpec]
    procs: dict[str, Proc]
    events: list[tuple[float, str]] = field(default_factory=list)
    memory: list[tuple[float, str, int]] = field(default_factory=list)  # wall time, sidecar, VmRSS KiB
    exits: dict[str, int | None] = field(default_factory=dict)

    def note(self, event: str) -> None:
        self.events.append((time.time(), event))


async def chaos(fleet: Fleet, session: aiohttp.ClientSession, config: Config, started: float) -> None:
    """The two faults, each at its point of the run."""
    await asyncio.sleep(max(0.0, started + config.duration * config.redis_stop_at - time.monotonic()))
    fleet.note("redis stopped")
    if config.pause_before_stop:
        await asyncio.to_thread(pause_clients, fleet.redis.url)
    await asyncio.to_thread(fleet.redis.stop)
    await asyncio.sleep(config.redis_down)
    await asyncio.to_thread(fleet.redis.start)
    fleet.note("redis started")
    await asyncio.sleep(max(0.0, started + config.duration * config.kill_at - time.monotonic()))
    victim = fleet.procs["A"]
    os.kill(victim.pid, signal.SIGKILL)
    fleet.note("A killed")
    fleet.exits["A (killed)"] = await asyncio.to_thread(victim.stop)
    await asyncio.sleep(config.kill_down)
    fleet.procs["A"] = fleet.specs["A"].start()
    fleet.note("A restarted")
    await wait_ready(session, fleet.procs["A"], fleet.specs["A"].admin)
    fleet.note("A ready")


def pause_clients(url: str) -> None:
    """Stop Redis running client commands, and give the replies of those it ran time to leave.

    A SIGTERM alone lets Redis run the commands it read in its last event-loop turn, write them to
    the append-only file, and exit before sending their replies: a sidecar then sees the connection
    lost after its script ran, and journals (open) or refuses (closed) a request already metered
    (tests/e2e/test_lost_reply.py). Paused first, the commands it holds never run."""
    client = redis.Redis.from_url(url)
    try:
        client.client_pause(int(PAUSE_SECONDS * 1000), all=True)
    finally:
        client.close()
    time.sleep(0.2)


async def sample_memory(fleet: Fleet, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        for name, proc in fleet.procs.items():
            rss = proc.memory_kib().get("VmRSS") if proc.alive() else None
            if rss:
                fleet.memory.append((time.time(), name, rss))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), SAMPLE_EVERY)


async def drive(
    fleet: Fleet, session: aiohttp.ClientSession, config: Config, workdir: Path
) -> dict[str, Any]:
    """Run the load generator for the duration with the faults and the sampler alongside; its results."""
    load_config = {
        "targets": [["127.0.0.1", spec.proxy_port] for spec in fleet.specs.values()],
        "customers": [[name, api_key(name)] for name in CUSTOMERS],
        "mix": MIX,
        "connections": config.connections,
        "seconds": config.duration,
    }
    (workdir / "load.json").write_text(json.dumps(load_config))
    argv = [*bench_module("bench.soakload"), str(workdir / "load.json"), str(workdir / "results.json")]
    stopping = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(fleet, stopping))
    load = Proc("load", argv, core=None, log=workdir / "load.log")
    faults = asyncio.create_task(chaos(fleet, session, config, time.monotonic()))
    try:
        code = await asyncio.wait_for(asyncio.to_thread(load.popen.wait), config.duration + 60)
        await asyncio.wait_for(faults, READY_TIMEOUT)
    finally:
        stopping.set()
        faults.cancel()
        await sampler
        load.stop()
    if code != 0:
        raise RuntimeError(f"the load generator exited {code}: {load.log_tail()}")
    results: dict[str, Any] = json.loads((workdir / "results.json").read_text())
    return results


async def store_counters(session: aiohttp.ClientSession, admin: str) -> dict[str, int]:
    """Units the store has metered this month per customer (the admin usage API). A 503 (a store
    call over the 50 ms store timeout on the loaded machine) is asked again, for up to 10 s."""
    counters = {}
    for customer in CUSTOMERS:
        deadline = time.monotonic() + 10
        while True:
            async with session.get(f"{admin}/admin/customers/{customer}/usage") as response:
                document = await response.json()
            if response.status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if response.status != 200:
            raise RuntimeError(f"the admin usage API answered {response.status}: {document}")
        counters[customer] = next(int(row["used"]) for row in document["limits"] if row["period"] == "month")
    return counters


async def billing_caught_up(
    receiver: Receiver, session: aiohttp.ClientSession, admin: str, config: Config
) -> tuple[dict[str, int], float]:
    """The store's counters, once billing holds as much (or when the drain timeout ends), and
    the seconds that took."""
    started = time.monotonic()
    while True:
        counters = await store_counters(session, admin)
        caught_up = all(receiver.totals().get(c, 0) == n for c, n in counters.items())
        if caught_up or time.monotonic() - started > config.drain_timeout:
            return counters, time.monotonic() - started
        await asyncio.sleep(0.5)


async def scrape(session: aiohttp.ClientSession, admin: str) -> list[str]:
    """The fault-related series of a sidecar's /metrics (its own counters since it started)."""
    names = (
        "sidecar_store_errors_total",
        "sidecar_journal_",
        "sidecar_lost_replies",
        "sidecar_billing_pushes_total",
    )
    async with session.get(f"{admin}/metrics") as response:
        text = await response.text()
    return [line for line in text.splitlines() if line.startswith(names) and "_created" not in line]


async def stop_sidecars(fleet: Fleet) -> None:
    """SIGTERM both, together: each drains and pushes every ended window before it exits."""
    names = list(fleet.procs)
    codes = await asyncio.gather(*(asyncio.to_thread(fleet.procs[n].stop, 30.0) for n in names))
    fleet.exits.update({f"{name} (SIGTERM)": code for name, code in zip(names, codes, strict=True)})


async def soak(config: Config, workdir: Path) -> Report:
    """Run the whole soak in `workdir` (logs and data are left there); every process is stopped
    before this returns, whatever happened."""
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(stop_all)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        receiver, billing_url = await serve_receiver(stack)
        store = EmbeddedRedis(workdir / "redis", persistent=True, port=free_port())
        await asyncio.to_thread(store.start)
        stack.callback(store.stop)
        upstream_port = free_port()
        upstream_argv = [*bench_module("bench.upstream"), "--listen", f"127.0.0.1:{upstream_port}"]
        upstream_proc = Proc("upstream", upstream_argv, core=None, log=workdir / "upstream.log")
        upstream_proc.wait_listening(upstream_port, READY_TIMEOUT)
        policy = workdir / "soak.yaml"
        policy.write_text(policy_text(billing_url, config))
        upstream = f"http://127.0.0.1:{upstream_port}"
        specs = {n: sidecar_spec(n, workdir, policy, upstream, store.url, config) for n in ("A", "B")}
        fleet = Fleet(store, specs, {name: spec.start() for name, spec in specs.items()})
        for name, spec in specs.items():
            await wait_ready(session, fleet.procs[name], spec.admin)
        results = await drive(fleet, session, config, workdir)
        counters, drained = await billing_caught_up(receiver, session, specs["B"].admin, config)
        metrics = {name: await scrape(session, spec.admin) for name, spec in specs.items()}
        await stop_sidecars(fleet)
        report = Report(
            config=config,
            outcomes=Outcomes.of(results, COSTS),
            events=fleet.events,
            memory=fleet.memory,
            exits=fleet.exits,
            billed=receiver.totals(),
            counters=counters,
            drain_seconds=drained,
            deliveries=receiver.deliveries,
            unique_summaries=len(receiver.first),
            conflicts=receiver.conflicts,
            metrics=metrics,
            failure_modes={name: PLANS[plan] for name, plan in CUSTOMERS.items()},
            refusable=frozenset(name for name, plan in CUSTOMERS.items() if plan == "throttled"),
            targets=list(specs),
        )
    return report


def parse(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, help="seconds of load (default 180; 24 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a short run, as the e2e test does")
    parser.add_argument(
        "--connections", type=int, help="keep-alive connections (default 128; 64 with --quick)"
    )
    parser.add_argument("--store-timeout", type=float, help="the sidecars' --store-timeout (default 0.05)")
    parser.add_argument(
        "--pause-redis-first",
        action="store_true",
        help="CLIENT PAUSE ALL before stopping Redis, so no reply of a command it ran is lost",
    )
    parser.add_argument("--write", type=Path, help="also write the report as Markdown to this file")
    parser.add_argument(
        "--workdir", type=Path, help="keep logs and data here (default: a temporary directory)"
    )
    options = parser.parse_args(argv)
    config = QUICK if options.quick else Config()
    overrides = {
        key: value
        for key, value in (
            ("duration", options.duration),
            ("connections", options.connections),
            ("store_timeout", options.store_timeout),
            ("pause_before_stop", options.pause_redis_first or None),
        )
        if value is not None
    }
    return replace(config, **overrides), options


def main(argv: list[str] | None = None) -> int:
    config, options = parse(argv)
    with contextlib.ExitStack() as stack:
        workdir = options.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        workdir.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(asyncio.wait_for(soak(config, workdir), config.duration + 240))
    command = shlex.join(["python", "-m", "bench.soak", *(argv if argv is not None else sys.argv[1:])])
    text = render(report, command)
    print(text)
    if options.write:
        options.write.write_text(text)
    return 1 if problems(report) else 0


if __name__ == "__main__":
    sys.exit(main())
