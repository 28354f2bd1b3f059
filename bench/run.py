"""`python -m bench`: the bare proxy and the sidecar under the same load, side by side.

Everything binds 127.0.0.1. Each proxy process serves one warm-up and then one measured load run
per mode (saturated, paced), of `--warmup` and `--duration` seconds (2 s and 10 s by default,
never over 15 s together); the whole bench is stopped by an alarm after `--budget` seconds, and
every process it started is stopped (SIGTERM, then SIGKILL) on the way out, whatever happened.

In order: the bare proxy and the sidecar for each customer count; both again on uvloop (first
customer count, saturated); the sidecar with 1 and with 2 workers allowed two cores (first
customer count, saturated); a sidecar refusing every request (the deny cache); a soak of the
sidecar with the largest customer count (its memory after each of `--soak-runs` runs); the store
call alone (bench.storecall); the profiles (py-spy).

Cores (with two or more; with one, nothing is pinned), the same for every run (bare, sidecar,
uvloop, refusals, soak, profiles):
  core 0 (LOAD_CORE): the load generator (wrk -t1 or bench.pyload), the upstream, redis-server,
    py-spy, this script
  core 1 (SERVER_CORE): the proxy under test (bare or sidecar), alone
Two exceptions: the `--workers` runs, whose sidecar (1 worker, then 2) may run on two cores (with
three or more, cores 1 and 2; with two, cores 0 and 1, beside everything on core 0), and the store
call alone, pinned to core 1 while nothing else runs there.

Paced runs wait `--pace` (25-75 by default) milliseconds before each request, drawn uniformly at
random (bench.loadgen); saturated runs do not wait. The targets reported are issue 14's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis

try:
    import uvloop
except ImportError:  # the uvloop rows are skipped
    uvloop = None  # type: ignore[assignment]

from bench import profile
from bench.loadgen import LoadResult, Pace, choose_tool, drive, pace_text, parse_pace, parse_result
from bench.policy import api_key, write_keys, write_policy
from bench.procs import (
    Cores,
    Proc,
    allowed_cores,
    core_list,
    core_set,
    cores,
    free_port,
    pin_existing,
    pinning_available,
    process_tree,
    run_bounded,
    stop_all,
)
from sidecar.store.redis.embedded import EmbeddedRedis, redis_server_binary

# The first two CPUs this process may use: the load's (load generator, upstream, Redis) and the proxy's.
LOAD_CORE, SERVER_CORE = allowed_cores()[:2] if pinning_available() else (None, None)
ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:begin (written by `python -m bench`) -->", "<!-- bench:end -->"
SIDECAR_STARTUP_TIMEOUT = 180.0
# After a load run, requests the generator gave up on at its deadline are still finishing; the
# counters are read once they have, so Redis's and the sidecar's agree.
SETTLE_SECONDS = 0.5
PROFILE_RATE = 100  # py-spy samples per second
MODES = ("saturated", "paced")
DEFAULT_PACE: Pace = (25, 75)
# Issue 14's targets.
TARGET_RATIO, AIM_RATIO = 0.9, 1.0  # saturated req/s, sidecar ÷ bare
TARGET_PACED_P50_MS, TARGET_PACED_P99_MS = 1.0, 2.0  # added latency, paced
TARGET_SATURATED_SLACK_MS = 1.0  # saturated added p50 beyond what Little's law explains
TARGET_REDIS_CPU_US = 30.0  # redis-server CPU per admitted request
TARGET_ROUND_TRIPS = 1.0  # per admitted request
ISSUE_CUSTOMERS = (1, 100_000)  # the customer counts the issue names
SCALE_WORKERS = 2


class BudgetExceeded(Exception):
    pass


@dataclass
class Snapshot:
    """Counters read around a measured run."""

    redis_calls: dict[str, int] = field(default_factory=dict)
    redis_cpu_s: float = 0.0
    decisions: dict[str, float] = field(default_factory=dict)
    overhead_sum: float = 0.0
    overhead_count: float = 0.0
    store_errors: float = 0.0
    proxy_cpu_s: float = 0.0
    upstream_cpu_s: float = 0.0
    round_trips: float = 0.0  # the sidecar's own count of pipelines written to Redis
    script_calls: float = 0.0


@dataclass
class Run:
    proxy: str  # "bare" or "sidecar", with "+uvloop" when run on uvloop
    customers: int
    mode: str  # "saturated" or "paced"
    load: LoadResult
    before: Snapshot
    after: Snapshot
    startup_s: float = 0.0
    peak_rss_kib: int = 0
    rss_kib: int = 0
    exit_code: int | None = None
    warmup_non_2xx: int = 0
    warmup_decisions: str = ""  # the sidecar's decisions other than admitted, from start to the first run
    workers: int = 1
    placement: tuple[int, ...] | None = None  # the proxy's cores when not the usual SERVER_CORE alone

    def delta_calls(self, *names: str) -> int:
        return sum(self.after.redis_calls.get(n, 0) - self.before.redis_calls.get(n, 0) for n in names)

    @property
    def all_commands(self) -> int:
        return self.delta_calls(*(set(self.after.redis_calls) - {"info"}))  # INFO is the bench's own

    @property
    def scripts(self) -> int:
        return self.delta_calls("evalsha", "eval")

    def breakdown(self) -> str:
        """Commands per admitted request by name, largest first (scripts' inner commands included)."""
        names = set(self.after.redis_calls) - {"info"}
        counts = sorted(((self.delta_calls(n), n) for n in names), reverse=True)
        return ", ".join(f"{n.upper()} {_fmt(self.per_request(c), 2)}" for c, n in counts if c)

    def decided(self, decision: str) -> int:
        return round(self.after.decisions.get(decision, 0) - self.before.decisions.get(decision, 0))

    @property
    def admitted(self) -> int:
        return self.decided("admitted")

    def per_request(self, value: float) -> float | None:
        """Per admitted request (the sidecar's metrics); per completed request for the bare proxy
        and for several workers, whose admin port (worker 0's) counts one worker only."""
        one_process = self.proxy.startswith("sidecar") and self.workers == 1
        requests = self.admitted if one_process else self.load.requests - self.load.non_2xx
        return value / requests if requests else None

    @property
    def round_trips(self) -> float:
        return self.after.round_trips - self.before.round_trips

    def per_refusal(self, value: float) -> float | None:
        refused = self.decided("refused")
        return value / refused if refused else None

    @property
    def batch_size(self) -> float | None:
        calls = self.after.script_calls - self.before.script_calls
        return calls / self.round_trips if self.round_trips else None

    def _us(self, seconds: float) -> float | None:
        value = self.per_request(seconds)
        return None if value is None else value * 1e6

    @property
    def proxy_cpu_us(self) -> float | None:
        return self._us(self.after.proxy_cpu_s - self.before.proxy_cpu_s)

    @property
    def upstream_cpu_us(self) -> float | None:
        return self._us(self.after.upstream_cpu_s - self.before.upstream_cpu_s)

    @property
    def redis_cpu_us(self) -> float | None:
        return self._us(self.after.redis_cpu_s - self.before.redis_cpu_s)

    @property
    def load_core_cpu_us(self) -> float | None:
        """What a request costs on the load's core: the upstream, redis-server and the load
        generator (its CPU over its whole run, per request it completed)."""
        parts = (self.upstream_cpu_us, self.redis_cpu_us, self.load.cpu_us)
        return None if any(p is None for p in parts) else sum(p or 0.0 for p in parts)

    @property
    def overhead_mean_ms(self) -> float | None:
        count = self.after.overhead_count - self.before.overhead_count
        return (self.after.overhead_sum - self.before.overhead_sum) / count * 1e3 if count else None


# ---------------------------------------------------------------------------------------------
# Reading the processes


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) and of its live children (`--workers`), from
    /proc/<pid>/stat."""
    total = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def read_metrics(admin_port: int) -> tuple[dict[str, float], float, float, float, dict[str, float]]:
    """From the sidecar's /metrics: requests by decision, overhead sum and count, store errors, and
    the store client's script calls and round trips."""
    text = _get(f"http://127.0.0.1:{admin_port}/metrics").decode()
    decisions: dict[str, float] = {}
    traffic: dict[str, float] = {}
    overhead_sum = overhead_count = store_errors = 0.0
    for line in text.splitlines():
        value = line.rsplit(" ", 1)[-1]
        if line.startswith(("sidecar_store_round_trips_total ", "sidecar_store_script_calls_total ")):
            traffic[line.split(" ", 1)[0]] = float(value)
        elif line.startswith("sidecar_requests_total{"):
            decision = re.search(r'decision="([^"]*)"', line)
            if decision:
                decisions[decision[1]] = decisions.get(decision[1], 0.0) + float(value)
        elif line.startswith("sidecar_overhead_seconds_sum"):
            overhead_sum = float(value)
        elif line.startswith("sidecar_overhead_seconds_count"):
            overhead_count = float(value)
        elif line.startswith("sidecar_store_errors_total{"):
            store_errors += float(value)
    return decisions, overhead_sum, overhead_count, store_errors, traffic


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})
    with _OPENER.open(request, timeout=5) as response:
        return bytes(response.read())


def snapshot(store: redis.Redis, proxy: Proc, upstream: Proc, admin_port: int | None) -> Snapshot:
    stats = store.info("commandstats")
    cpu = store.info("cpu")
    shot = Snapshot(
        redis_calls={k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()},
        redis_cpu_s=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        proxy_cpu_s=cpu_seconds(proxy.pid),
        upstream_cpu_s=cpu_seconds(upstream.pid),
    )
    if admin_port is not None:
        shot.decisions, shot.overhead_sum, shot.overhead_count, shot.store_errors, traffic = read_metrics(
            admin_port
        )
        shot.round_trips = traffic.get("sidecar_store_round_trips_total", 0.0)
        shot.script_calls = traffic.get("sidecar_store_script_calls_total", 0.0)
    return shot


# ---------------------------------------------------------------------------------------------
# The bench


@dataclass
class Options:
    customers: list[int]
    warmup: float
    duration: float
    connections: int
    pace: Pace
    loadgen: str
    profile: bool
    uvloop: bool
    output: Path | None
    keep_profile: Path | None
    budget: float
    command: str
    extras: bool = True  # the workers runs, the refusal run and the soak
    soak_runs: int = 4


class Bench:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.o = options
        self.workdir = workdir
        self.tool = choose_tool(options.loadgen)
        self.runs: list[Run] = []
        self.profiles: dict[str, tuple[profile.Summary, LoadResult]] = {}
        self.leaves: tuple[profile.Summary, LoadResult] | None = None
        self.policy_seconds: dict[int, float] = {}
        self.notes: list[str] = []
        self.redis: EmbeddedRedis | None = None
        self.storecall: dict[str, dict[str, object]] = {}
        self.refused: Run | None = None
        self.soak: list[tuple[int, int]] = []  # (requests served so far, VmRSS KiB)
        self.soak_customers = 0

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def run(self) -> None:
        self.redis = EmbeddedRedis(self.workdir / "redis", persistent=False)
        self.redis_url = self.redis.start()
        assert self.redis.pid is not None
        pin_existing(self.redis.pid, LOAD_CORE)
        self.store = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        self.upstream, self.upstream_url = self.start_upstream("upstream", LOAD_CORE)
        self.log(f"redis-server {self.redis_url} (pid {self.redis.pid}), upstream {self.upstream_url}")
        self.log(f"load generator: {self.tool}")
        for customers in self.o.customers:
            directory = self.workdir / f"n{customers}"
            directory.mkdir()
            started = time.perf_counter()
            policy = write_policy(directory, customers)
            keys = write_keys(directory, customers)
            self.policy_seconds[customers] = time.perf_counter() - started
            self.log(
                f"{customers} customers: policy {policy.stat().st_size / 1e6:.1f} MB written in "
                f"{self.policy_seconds[customers]:.2f}s"
            )
            self.runs += self.measure("bare", customers, policy, keys)
            self.runs += self.measure("sidecar", customers, policy, keys)
            if customers == self.o.customers[0]:
                first_policy, first_keys = policy, keys
        if self.o.uvloop:
            if uvloop is None:
                self.notes.append("uvloop is not installed (`pip install uvloop`): no uvloop rows.")
            else:
                for kind in ("bare+uvloop", "sidecar+uvloop"):
                    self.runs += self.measure(
                        kind, self.o.customers[0], first_policy, first_keys, ("saturated",)
                    )
        if self.o.extras:
            first = self.o.customers[0]
            placement = worker_cores(SCALE_WORKERS)
            for workers in (1, SCALE_WORKERS):
                self.runs += self.measure(
                    "sidecar",
                    first,
                    first_policy,
                    first_keys,
                    ("saturated",),
                    workers=workers,
                    placement=placement,
                )
            self.run_refused()
            largest = max(self.o.customers)
            self.run_soak(largest, self.workdir / f"n{largest}")
        self.run_storecall(first_policy)
        if self.o.profile:
            self.run_profiles()

    def start_upstream(self, name: str, core: Cores) -> tuple[Proc, str]:
        port = free_port()
        proc = Proc(
            name,
            [sys.executable, "-m", "bench.upstream", "--listen", f"127.0.0.1:{port}"],
            core=core,
            log=self.workdir / f"{name}.log",
        )
        proc.wait_listening(port, 30)
        return proc, f"http://127.0.0.1:{port}"

    def start_proxy(
        self, kind: str, policy: Path, name: str, workers: int = 1, placement: Cores = None
    ) -> tuple[Proc, int, int | None, float]:
        """Start a proxy (on SERVER_CORE unless `placement` says otherwise) and wait for it; a port
        taken between the probe and the bind is retried."""
        for attempt in range(3):
            try:
                return self._start_proxy(kind, policy, name, workers, placement)
            except RuntimeError as error:
                if "address already in use" not in str(error) or attempt == 2:
                    raise
                self.log(f"{name}: its port was taken before it could bind; starting it again")
        raise AssertionError("unreachable")

    def _start_proxy(
        self, kind: str, policy: Path, name: str, workers: int, placement: Cores
    ) -> tuple[Proc, int, int | None, float]:
        upstream_url = self.upstream_url
        port = free_port()
        admin: int | None = None
        on_uvloop = kind.endswith("+uvloop")
        if kind.startswith("bare"):
            argv = [
                sys.executable,
                "-m",
                "bench.bare_proxy",
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                upstream_url,
                *(["--uvloop"] if on_uvloop else []),
            ]
            timeout = 30.0
        else:
            admin = free_port()
            argv = [
                sys.executable,
                "-m",
                "sidecar",
                "run",
                *(["--loop", "uvloop"] if on_uvloop else []),
                *(["--workers", str(workers)] if workers > 1 else []),
                "--redis",
                self.redis_url,
                "--upstream",
                upstream_url,
                "--listen",
                f"127.0.0.1:{port}",
                "--admin",
                f"127.0.0.1:{admin}",
                "--policies",
                str(policy),
                "--log-level",
                "WARNING",
                "--drain-timeout",
                "5",
            ]
            timeout = SIDECAR_STARTUP_TIMEOUT
        core = SERVER_CORE if placement is None else placement
        proc = Proc(name, argv, core=core, log=self.workdir / f"{name}.log")
        startup = proc.wait_listening(port, timeout)
        # One request by hand: the key works and the whole chain answers 200.
        body = _get(f"http://127.0.0.1:{port}/hello", {"X-API-Key": api_key(0)})
        if kind.startswith("sidecar") and b"customer-0" not in body:
            raise RuntimeError(f"unexpected first answer from the sidecar: {body[:200]!r}")
        return proc, port, admin, startup

    def load(self, url: str, keys: Path, seconds: float, pace: Pace | None = None) -> LoadResult:
        return drive(
            self.tool,
            url,
            keys=keys,
            connections=self.o.connections,
            seconds=seconds,
            core=LOAD_CORE,
            workdir=self.workdir,
            pace=pace,
        )

    def measure(
        self,
        kind: str,
        customers: int,
        policy: Path,
        keys: Path,
        modes: tuple[str, ...] = MODES,
        *,
        workers: int = 1,
        placement: tuple[int, ...] | None = None,
    ) -> list[Run]:
        """One proxy process: a warm-up, then a measured run per mode (saturated, paced). With a
        `placement`, the proxy may run on those cores instead of SERVER_CORE alone."""
        name = f"{kind}-{customers}" + (f"-{workers}w" if workers > 1 else "")
        if placement is not None:
            name += "-cores" + core_list(placement).replace(",", "+")
        proc, port, admin, startup = self.start_proxy(kind, policy, name, workers, placement)
        if placement is not None:
            where = f"cores {core_list(placement)}" if core_set(placement) else "unpinned"
            kind = f"{kind} ({workers} worker{'s' if workers > 1 else ''}, {where})"
        elif workers > 1:
            kind = f"{kind} ({workers} workers)"
        self.log(f"{kind} ({customers} customers) listening after {startup:.2f}s, pid {proc.pid}")
        runs: list[Run] = []
        try:
            url = f"http://127.0.0.1:{port}/hello"
            warmup = self.load(url, keys, self.o.warmup)
            if warmup.non_2xx or warmup.socket_errors:
                self.log(f"{kind} warm-up: non-2xx {warmup.non_2xx}, socket errors {warmup.socket_errors}")
            for mode in modes:
                time.sleep(SETTLE_SECONDS)
                before = snapshot(self.store, proc, self.upstream, admin)
                load = self.load(url, keys, self.o.duration, self.o.pace if mode == "paced" else None)
                time.sleep(SETTLE_SECONDS)
                after = snapshot(self.store, proc, self.upstream, admin)
                first = not runs  # the warm-up is reported with the process's first run
                run = Run(
                    kind, customers, mode, load, before, after, startup, workers=workers, placement=placement
                )
                run.warmup_non_2xx = warmup.non_2xx if first else -1
                if first:
                    run.warmup_decisions = ", ".join(
                        f"{k} {v:.0f}" for k, v in sorted(before.decisions.items()) if k != "admitted" and v
                    )
                runs.append(run)
                extra = (
                    f", EVALSHA/admitted {_fmt(run.per_request(run.scripts), 3)}"
                    if kind.startswith("sidecar")
                    else ""
                )
                self.log(
                    f"{kind} ({customers} customers, {mode}): {load.rps:.0f} req/s, "
                    f"p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms, non-2xx {load.non_2xx}, "
                    f"socket errors {load.socket_errors}{extra}"
                )
            memory = proc.memory_kib()
        finally:
            exit_code = proc.stop()
        for run in runs:
            run.peak_rss_kib, run.rss_kib, run.exit_code = (
                memory.get("VmHWM", 0),
                memory.get("VmRSS", 0),
                exit_code,
            )
        self.log(
            f"{kind} ({customers} customers) stopped, exit {exit_code}, "
            f"peak RSS {runs[0].peak_rss_kib / 1024:.0f} MiB"
        )
        return runs

    def run_refused(self) -> None:
        """One customer over a hard limit (a month quota of 1, used by the first request): every
        measured request is a refusal, which the deny cache answers without Redis."""
        directory = self.workdir / "refused"
        directory.mkdir()
        self.store.flushall()  # customer-0's counters from the runs before: its first request must pass
        policy, keys = write_policy(directory, 1, month_limit=1), write_keys(directory, 1)
        proc, port, admin, startup = self.start_proxy("sidecar", policy, "sidecar-refused")
        try:
            url = f"http://127.0.0.1:{port}/hello"
            self.load(url, keys, self.o.warmup)
            time.sleep(SETTLE_SECONDS)
            before = snapshot(self.store, proc, self.upstream, admin)
            load = self.load(url, keys, self.o.duration)
            time.sleep(SETTLE_SECONDS)
            after = snapshot(self.store, proc, self.upstream, admin)
        finally:
            proc.stop()
        self.refused = Run("sidecar (every request refused)", 1, "saturated", load, before, after, startup)
        self.log(
            f"refused: {load.rps:.0f} req/s, p50 {load.p50_ms:.2f} ms, EVALSHA per refusal "
            f"{_fmt(self.refused.per_refusal(self.refused.scripts), 4)}"
        )

    def run_soak(self, customers: int, directory: Path) -> None:
        """The sidecar with the largest customer count under `soak_runs` saturated runs back to
        back, every request a different customer: its resident memory after each."""
        policy, keys = directory / "bench.yaml", directory / "keys.txt"
        proc, port, _, _ = self.start_proxy("sidecar", policy, f"sidecar-soak-{customers}")
        try:
            url = f"http://127.0.0.1:{port}/hello"
            self.load(url, keys, self.o.warmup)
            served = 0
            self.soak = [(0, proc.memory_kib().get("VmRSS", 0))]
            for _ in range(self.o.soak_runs):
                load = self.load(url, keys, self.o.duration)
                served += load.requests
                self.soak.append((served, proc.memory_kib().get("VmRSS", 0)))
        finally:
            proc.stop()
        self.soak_customers = customers
        self.log(f"soak: RSS {' → '.join(f'{kib / 1024:.0f}' for _, kib in self.soak)} MiB")

    def run_storecall(self, policy: Path) -> None:
        """The store call alone (bench.storecall), pinned to the proxy's core while it is idle."""
        loops: list[tuple[str, list[str]]] = [("asyncio", [])]
        if self.o.uvloop and uvloop is not None:
            loops.append(("uvloop", ["--uvloop"]))
        for name, extra in loops:
            argv = [sys.executable, "-m", "bench.storecall", "--redis", self.redis_url]
            argv += ["--policy", str(policy)]
            completed = run_bounded([*argv, *extra], core=SERVER_CORE, timeout=120)
            self.storecall[name] = parse_result(completed, "bench.storecall")
            self.log(f"store call alone ({name}) measured")

    def run_profiles(self) -> None:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(pyspy).exists():
            self.notes.append("py-spy is not installed (`pip install py-spy`): no profile was taken.")
            self.log("py-spy not found: no profile")
            return
        for kind in ("bare", "sidecar"):
            self.run_profile(kind, pyspy)

    def run_profile(self, kind: str, pyspy: str) -> None:
        """One proxy with 1 customer under py-spy for one saturated load run; the sidecar for a
        second one with a non-blocking py-spy, whose top frames are not biased to system calls."""
        directory = self.workdir / f"profile-{kind}"
        directory.mkdir()
        policy, keys = write_policy(directory, 1), write_keys(directory, 1)
        proc, port, _, _ = self.start_proxy(kind, policy, f"{kind}-profiled")
        url = f"http://127.0.0.1:{port}/hello"
        try:
            self.load(url, keys, self.o.warmup)
            output = directory / "blocking.txt"
            load = self.sample(pyspy, proc, url, keys, output, [])
            if output.exists():
                self.profiles[kind] = (profile.summarise(output.read_text()), load)
            if kind == "sidecar":
                output = directory / "nonblocking.txt"
                leaves_load = self.sample(pyspy, proc, url, keys, output, ["--nonblocking", "--threads"])
                if output.exists():
                    self.leaves = (profile.summarise_leaves(output.read_text(), proc.pid), leaves_load)
        finally:
            proc.stop()

    def sample(
        self, pyspy: str, proc: Proc, url: str, keys: Path, output: Path, flags: list[str]
    ) -> LoadResult:
        """py-spy on `proc` during one saturated load run of --duration seconds."""
        seconds = self.o.duration
        argv = [pyspy, "record", "--pid", str(proc.pid), "--duration", str(round(seconds))]
        argv += ["--rate", str(PROFILE_RATE), "--idle", "--format", "raw", "-o", str(output), *flags]
        spy = Proc("py-spy", argv, core=LOAD_CORE, log=self.workdir / "py-spy.log")
        how = " ".join(flags) or "blocking"
        self.log(f"profiling {proc.name} (pid {proc.pid}) with py-spy ({how}) for {seconds:.0f}s")
        load = self.load(url, keys, seconds)
        deadline = time.monotonic() + 20
        while spy.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        spy.stop()
        if not output.exists():
            self.notes.append(f"py-spy ({how}) wrote no profile of {proc.name}: {spy.log_tail(500)}")
        elif self.o.keep_profile is not None:
            mode = "-".join(f.strip("-") for f in flags) or "blocking"
            name = f"{proc.name}-{mode}-{self.o.keep_profile.name}"
            shutil.copyfile(output, self.o.keep_profile.with_name(name))
        self.log(f"profiled run: {load.rps:.0f} req/s, p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms")
        return load

    # -----------------------------------------------------------------------------------------
    # Reporting

    def pairs(self, mode: str) -> list[tuple[Run, Run]]:
        bare = {r.customers: r for r in self.runs if r.proxy == "bare" and r.mode == mode}
        return [
            (bare[r.customers], r)
            for r in self.runs
            if r.proxy == "sidecar" and r.mode == mode and r.customers in bare
        ]

    def table(self, mode: str) -> str:
        lines = [
            "| customers | proxy | req/s | p50 ms | p99 ms | non-2xx | socket errors | sidecar/bare "
            "| added p50 ms | added p99 ms | EVALSHA per admitted | round trips per admitted "
            "| EVALSHA per round trip | Redis commands per admitted (incl. inside the script) "
            "| Redis CPU µs per admitted | proxy CPU µs/req | peak RSS MiB | startup s |",
            "|---:|---|" + "---:|" * 16,
        ]
        for bare, side in self.pairs(mode):
            for run in (bare, side):
                is_side = run is side
                cells = [
                    f"{run.customers:,}",
                    run.proxy,
                    f"{run.load.rps:,.0f}",
                    f"{run.load.p50_ms:.2f}",
                    f"{run.load.p99_ms:.2f}",
                    str(run.load.non_2xx),
                    str(run.load.socket_errors),
                    f"**{side.load.rps / bare.load.rps:.2f}**" if is_side and bare.load.rps else "",
                    f"{side.load.p50_ms - bare.load.p50_ms:+.2f}" if is_side else "",
                    f"{side.load.p99_ms - bare.load.p99_ms:+.2f}" if is_side else "",
                    _fmt(run.per_request(run.scripts), 3) if is_side else "—",
                    _fmt(run.per_request(run.round_trips), 3) if is_side else "—",
                    _fmt(run.batch_size, 2) if is_side else "—",
                    _fmt(run.per_request(run.all_commands), 2) if is_side else "—",
                    _fmt(run.redis_cpu_us, 1) if is_side else "—",
                    _fmt(run.proxy_cpu_us, 0),
                    f"{run.peak_rss_kib / 1024:.0f}",
                    f"{run.startup_s:.2f}",
                ]
                lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def uvloop_table(self) -> str:
        runs = [r for r in self.runs if r.mode == "saturated" and r.customers == self.o.customers[0]]
        by_kind = {r.proxy: r for r in runs}
        bare = by_kind.get("bare")
        lines = [
            "| proxy | req/s | p50 ms | p99 ms | non-2xx | ÷ bare (asyncio) | proxy CPU µs/req "
            "| upstream CPU µs/req | EVALSHA per admitted |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for kind in ("bare", "bare+uvloop", "sidecar", "sidecar+uvloop"):
            run = by_kind.get(kind)
            if run is None:
                continue
            ratio = f"{run.load.rps / bare.load.rps:.2f}" if bare and bare.load.rps else "—"
            trips = _fmt(run.per_request(run.scripts), 3) if kind.startswith("sidecar") else "—"
            lines.append(
                f"| {kind} | {run.load.rps:,.0f} | {run.load.p50_ms:.2f} | {run.load.p99_ms:.2f} "
                f"| {run.load.non_2xx} | {ratio} | {_fmt(run.proxy_cpu_us, 0)} "
                f"| {_fmt(run.upstream_cpu_us, 0)} | {trips} |"
            )
        return "\n".join(lines)

    def storecall_table(self) -> str:
        lines = [
            "| the store call | loop | CPU µs per call | wall µs per call | failed (warm-up / measured) |",
            "|---|---|---:|---:|---:|",
        ]
        for loop, result in self.storecall.items():
            for variant in result["variants"]:  # type: ignore[attr-defined]
                lines.append(
                    f"| {variant['name']} | {loop} | {variant['cpu_us']:.0f} | {variant['wall_us']:.0f} "
                    f"| {variant['warmup_failed']} / {variant['failed']} |"
                )
        arguments = "; ".join(
            f"{loop}: {float(result['arguments_us']):.1f} µs"  # type: ignore[arg-type]
            for loop, result in self.storecall.items()
        )
        return (
            "\n".join(lines) + "\n\nBuilding the windows and the script's KEYS/ARGV alone (`meter_request` + "
            f"`script_arguments`, no I/O, timeit): {arguments} per call."
        )

    def details(self) -> str:
        lines = [
            "| proxy | customers | load | admitted (sidecar metrics) | other decisions | store errors "
            "| warm-up non-2xx | overhead before forwarding, mean ms | redis-server CPU µs/req "
            "| RSS at end MiB | exit code |",
            "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for side in self.runs:
            if not side.proxy.startswith("sidecar"):
                continue
            others = {k: side.decided(k) for k in side.after.decisions if k != "admitted" and side.decided(k)}
            lines.append(
                f"| {side.proxy} | {side.customers:,} | {side.mode} | {side.admitted:,} | {others or 'none'} "
                f"| {side.after.store_errors - side.before.store_errors:.0f} "
                f"| {_warmup(side)} "
                f"| {_fmt(side.overhead_mean_ms, 3)} | {_fmt(side.redis_cpu_us, 1)} "
                f"| {side.rss_kib / 1024:.0f} | {side.exit_code} |"
            )
        lines += ["", *self.cpu_table()]
        lines += [
            "",
            "Redis commands per admitted request, by name (`INFO commandstats`, saturated runs):",
            "",
        ]
        lines += [
            f"- {side.customers:,} customers: {side.breakdown()}" for _, side in self.pairs("saturated")
        ]
        return "\n".join(lines)

    def cpu_table(self) -> list[str]:
        """CPU per request on each core, for the runs in the usual layout."""
        if SERVER_CORE is None:
            where = "on the one core every process shares"
            proxy_core = load_core = "the core"
        else:
            where = f"on core {SERVER_CORE} (the proxy, alone) and core {LOAD_CORE} (the rest)"
            proxy_core, load_core = f"core {SERVER_CORE}", f"core {LOAD_CORE}"
        lines = [
            f"CPU per request {where}: utime + stime from `/proc/<pid>/stat` for the proxy and the "
            "upstream, `INFO cpu` for redis-server, the load generator's rusage once it exited "
            "(its whole run, per request it completed). A saturated run is held to the smaller of "
            f"10⁶ ÷ the proxy's µs ({proxy_core}) and 10⁶ ÷ the rest's sum ({load_core}); which one "
            "binds says whether the ratio measures the proxies or the load's core:",
            "",
            "| customers | load | proxy | proxy CPU µs/req | 10⁶ ÷ proxy | upstream CPU µs/req "
            "| redis-server CPU µs/req | load generator CPU µs/req | the rest, sum | 10⁶ ÷ the rest "
            "| measured req/s |",
            "|---:|---|---|" + "---:|" * 8,
        ]
        for run in self.runs:
            if run.placement is not None:
                continue  # the workers runs: their own table
            rest = run.load_core_cpu_us
            lines.append(
                f"| {run.customers:,} | {run.mode} | {run.proxy} | {_fmt(run.proxy_cpu_us, 0)} "
                f"| {_ceiling(run.proxy_cpu_us)} | {_fmt(run.upstream_cpu_us, 0)} "
                f"| {_fmt(run.redis_cpu_us, 0)} | {_fmt(run.load.cpu_us, 0)} | {_fmt(rest, 0)} "
                f"| {_ceiling(rest)} | {run.load.rps:,.0f} |"
            )
        if SERVER_CORE is None:
            lines += ["", "(With one core the two ceilings are one: 10⁶ ÷ the sum of both.)"]
        return lines

    def targets(self) -> str:
        """Issue 14's targets, each met or missed, from this run."""
        checks: list[tuple[str, bool]] = []  # every check, for the summary line
        lines: list[str] = []
        saturated = {side.customers: (bare, side) for bare, side in self.pairs("saturated")}
        paced = {side.customers: (bare, side) for bare, side in self.pairs("paced")}
        connections = self.o.connections
        for customers in sorted(set(saturated) | set(paced) | set(ISSUE_CUSTOMERS)):
            plural = "s" if customers != 1 else ""
            if customers not in saturated and customers not in paced:
                lines.append(f"- {customers:,} customer{plural}: not measured in this run (`--customers`).")
                continue
            mine: list[tuple[str, bool]] = []
            if customers in saturated:
                bare, side = saturated[customers]
                ratio = side.load.rps / bare.load.rps if bare.load.rps else 0.0
                mine.append(
                    (
                        f"throughput {ratio:.2f}× bare (≥ {TARGET_RATIO:g}×, aim ≥ {AIM_RATIO:.1f}×)",  # noqa: RUF001
                        ratio >= TARGET_RATIO,
                    )
                )
                added = side.load.p50_ms - bare.load.p50_ms
                explained = _little_ms(connections, side.load.rps) - _little_ms(connections, bare.load.rps)
                mine.append(
                    (
                        f"saturated added p50 {added:+.2f} ms, the ratio explains {explained:+.2f} ms "
                        f"({connections} ÷ {side.load.rps:,.0f} - {connections} ÷ {bare.load.rps:,.0f} "
                        f"req/s; ≤ explained + {TARGET_SATURATED_SLACK_MS:g} ms)",
                        added <= explained + TARGET_SATURATED_SLACK_MS,
                    )
                )
            if customers in paced:
                bare, side = paced[customers]
                added50, added99 = side.load.p50_ms - bare.load.p50_ms, side.load.p99_ms - bare.load.p99_ms
                mine += [
                    (
                        f"paced added p50 {added50:+.2f} ms (≤ {TARGET_PACED_P50_MS:g} ms)",
                        added50 <= TARGET_PACED_P50_MS,
                    ),
                    (
                        f"paced added p99 {added99:+.2f} ms (≤ {TARGET_PACED_P99_MS:g} ms)",
                        added99 <= TARGET_PACED_P99_MS,
                    ),
                ]
            for mode, runs in (("saturated", saturated), ("paced", paced)):
                if customers not in runs:
                    continue
                side = runs[customers][1]
                redis_cpu, trips = side.redis_cpu_us, side.per_request(side.round_trips)
                mine += [
                    (
                        f"Redis CPU {_fmt(redis_cpu, 1)} µs per admitted request {mode} "
                        f"(≤ {TARGET_REDIS_CPU_US:g} µs)",
                        redis_cpu is not None and redis_cpu <= TARGET_REDIS_CPU_US,
                    ),
                    (
                        f"{_fmt(trips, 3)} Redis round trips per admitted request {mode} "
                        f"(≤ {TARGET_ROUND_TRIPS:g})",
                        trips is not None and trips <= TARGET_ROUND_TRIPS,
                    ),
                ]
            checks += mine
            lines.append(f"- {customers:,} customer{plural}: {_marks(mine)}.")
        refused = self.refused
        if refused is None:
            lines.append(
                "- Refusals in the deny cache: not measured in this run (`--quick` or `--no-extras`)."
            )
        else:
            calls = refused.after.script_calls - refused.before.script_calls
            trips = refused.per_refusal(refused.round_trips)
            mine = [
                (
                    f"{_fmt(refused.per_refusal(calls), 4)} hot-path EVALSHA and {_fmt(trips, 4)} round "
                    f"trips per refusal ({calls:.0f} calls in all: < 0.001 a refusal, the deny cache "
                    "answering; what calls there are come from the key cache and the deny cache "
                    "asking again when their entries expire, every 10 s at most per customer; Redis "
                    f"counted {_fmt(refused.per_refusal(refused.scripts), 4)} EVALSHA per refusal from "
                    "every source, see Refusals)",
                    trips is not None and trips < 0.001 and (refused.per_refusal(calls) or 0) < 0.001,
                )
            ]
            checks += mine
            lines.append(f"- Refusals in the deny cache: {_marks(mine)}.")
        lines.append(f"- `--workers {SCALE_WORKERS}`: {self.scaling_text()}")
        missed = [text for text, ok in checks if not ok]
        summary = (
            f"**All {len(checks)} targets measured here are met.**"
            if not missed
            else f"**{len(checks) - len(missed)} of {len(checks)} targets measured here are met; missed:** "
            + "; ".join(missed)
            + "."
        )
        return "\n".join([*lines, "", summary])

    def scaling_runs(self) -> tuple[Run | None, Run | None]:
        """The `--workers` runs: 1 worker and SCALE_WORKERS workers on the same cores."""
        placed = [r for r in self.runs if r.placement is not None]
        one = next((r for r in placed if r.workers == 1), None)
        more = next((r for r in placed if r.workers == SCALE_WORKERS), None)
        return one, more

    def scaling_text(self) -> str:
        one, more = self.scaling_runs()
        if one is None or more is None or more.placement is None:
            return "not measured in this run (`--quick` or `--no-extras`)."
        ratio = more.load.rps / one.load.rps if one.load.rps else 0.0
        text = (
            f"{more.load.rps:,.0f} req/s, {ratio:.2f}× the {one.load.rps:,.0f} of 1 worker on the same "  # noqa: RUF001
            f"{_cores_text(more.placement)} (measured, not a target"
        )
        if LOAD_CORE is not None and LOAD_CORE in more.placement:
            text += f"; core {LOAD_CORE} is shared with the load, so this is a lower bound"
        return text + "; see Workers)."

    def workers_table(self) -> str:
        pinned = next(
            (
                r
                for r in self.runs
                if r.proxy == "sidecar" and r.mode == "saturated" and r.customers == self.o.customers[0]
            ),
            None,
        )
        one, more = self.scaling_runs()
        lines = [
            "| proxy | cores | req/s | ÷ 1 worker, same cores | p50 ms | p99 ms | non-2xx "
            "| proxy CPU µs/req (all workers) | upstream + redis-server + load generator CPU µs/req "
            "| all, µs/req | cores in use × 10⁶ ÷ all | EVALSHA per request "  # noqa: RUF001
            "| EVALSHA per round trip (worker 0) "
            "| RSS at end MiB (all processes) |",
            "|---|---|" + "---:|" * 12,
        ]
        for run in (pinned, one, more):
            if run is None:
                continue
            if run.placement is None:
                where = f"{SERVER_CORE} alone" if SERVER_CORE is not None else "the one core"
                proxy_cores = core_set(SERVER_CORE)
            else:
                where = core_list(run.placement) or "the one core"
                proxy_cores = run.placement
            width = len({*proxy_cores, *core_set(LOAD_CORE)}) or 1
            ratio = (
                f"{run.load.rps / one.load.rps:.2f}"
                if one is not None and run.placement and one.load.rps
                else "—"
            )
            rest = run.load_core_cpu_us
            total = None if run.proxy_cpu_us is None or rest is None else run.proxy_cpu_us + rest
            lines.append(
                f"| {run.proxy} | {where} | {run.load.rps:,.0f} | {ratio} | {run.load.p50_ms:.2f} "
                f"| {run.load.p99_ms:.2f} | {run.load.non_2xx} | {_fmt(run.proxy_cpu_us, 0)} "
                f"| {_fmt(rest, 0)} "
                f"| {_fmt(total, 0)} | {_ceiling(total, width)} "
                f"| {_fmt(run.per_request(run.scripts), 3)} | {_fmt(run.batch_size, 2)} "
                f"| {run.rss_kib / 1024:.0f} |"
            )
        return "\n".join(lines)

    def refused_section(self) -> list[str]:
        run = self.refused
        if run is None:
            return []
        refused = run.decided("refused")
        cpu = run.per_refusal(run.after.proxy_cpu_s - run.before.proxy_cpu_s)
        calls = run.after.script_calls - run.before.script_calls
        return [
            "### Refusals (the deny cache)",
            "",
            "One customer whose month quota (1) the first request used up, so every measured request is "
            f"a 429; {self.tool}, {self.o.connections} connections, {self.o.duration:g} s saturated. "
            "Hot-path EVALSHA and round trips: the sidecar's own `sidecar_store_script_calls_total` and "
            "`sidecar_store_round_trips_total` (its admission batcher); EVALSHA (Redis): "
            "`cmdstat_evalsha` + `cmdstat_eval`, which also counts the sidecar's background scripts "
            "(the billing and notification outboxes), off the hot path.",
            "",
            "| proxy | req/s | p50 ms | p99 ms | refused (sidecar metrics) | hot-path EVALSHA per refusal "
            "| round trips per refusal | EVALSHA per refusal (Redis, every source) "
            "| proxy CPU µs per refusal |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {run.proxy} | {run.load.rps:,.0f} | {run.load.p50_ms:.2f} | {run.load.p99_ms:.2f} "
            f"| {refused:,} | {_fmt(run.per_refusal(calls), 4)} "
            f"| {_fmt(run.per_refusal(run.round_trips), 4)} "
            f"| {_fmt(run.per_refusal(run.scripts), 4)} | {_fmt(None if cpu is None else cpu * 1e6, 0)} |",
            "",
        ]

    def soak_section(self) -> list[str]:
        if not self.soak:
            return []
        steps = " → ".join(f"{kib / 1024:.0f} MiB ({served:,} requests)" for served, kib in self.soak)
        return [
            "### Memory under sustained load",
            "",
            f"One sidecar with {self.soak_customers:,} customers, after its warm-up and then after each of "
            f"{len(self.soak) - 1} saturated runs of {self.o.duration:g} s back to back, every request "
            f"the next customer's key (VmRSS): {steps}.",
            "",
        ]

    def extra_sections(self) -> list[str]:
        parts: list[str] = []
        first = self.o.customers[0]
        one, more = self.scaling_runs()
        if one is not None and more is not None and more.placement is not None:
            parts += [
                f"### Workers ({first:,} customer{'s' if first != 1 else ''}, saturated)",
                "",
                self.workers_text(more.placement),
                "",
                self.workers_table(),
                "",
            ]
        parts += self.refused_section() + self.soak_section()
        if any(r.proxy.endswith("+uvloop") for r in self.runs):
            parts += [
                f"### uvloop ({first:,} customer{'s' if first != 1 else ''}, saturated)",
                "",
                "The same two proxies on uvloop's event loop: the sidecar with `--loop uvloop`, "
                "the bare proxy with `--uvloop`. The upstream stays on asyncio.",
                "",
                self.uvloop_table(),
                "",
            ]
        if self.storecall:
            parts += [
                "### The store call alone",
                "",
                f"`bench/storecall.py`, pinned to core {SERVER_CORE} while nothing else runs there: 50 "
                "concurrent callers, 5,000 calls to the same Redis, no HTTP; the cheapest of 3 runs per "
                "variant. Failed: calls that hit the sidecar's 50 ms store timeout (the warm-up is when "
                "the pool opens its connections).",
                "",
                self.storecall_table(),
                "",
            ]
        return parts

    def workers_text(self, placement: tuple[int, ...]) -> str:
        where = _cores_text(placement)
        text = (
            f"What a second worker buys when it gets a core: the sidecar with `--workers {SCALE_WORKERS}` "
            f"and, for comparison, with 1 worker, both allowed {where} (not pinned to one of them: the "
            "kernel places the processes), beside the first row, the sidecar of the saturated table "
            "pinned to its core alone. "
        )
        if LOAD_CORE is not None and LOAD_CORE in placement:
            text += (
                f"This machine has no core to spare: core {LOAD_CORE} also runs the load generator, the "
                "upstream and redis-server, so the second worker gets only what they leave of it, and "
                f"the {SCALE_WORKERS}-worker ÷ 1-worker ratio is a lower bound of what a core of its own "
                "would give. "
            )
        elif placement:
            text += "Those cores run nothing else, so the ratio is the scaling itself. "
        text += (
            f"The earlier row of {SCALE_WORKERS} workers pinned to the proxy's one core is gone: it "
            "measured what a second process costs on a shared core, not what it scales to. "
            "Per request: per completed request for several workers, since worker 0's /metrics counts "
            "only its own. `cores in use × 10⁶ ÷ all`: the rate if all the CPU a request costs (every "  # noqa: RUF001
            "process of the run) spread evenly over the cores in use, a ceiling no placement passes."
        )
        return text

    def profile_section(self) -> list[str]:
        o = self.o
        loads = ", ".join(
            f"{kind} {load.rps:,.0f} req/s (p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms)"
            for kind, (_, load) in self.profiles.items()
        )
        parts = [
            "",
            f"### Profiles: 1 customer, {o.duration:g} s saturated",
            "",
            f"`py-spy record --rate {PROFILE_RATE} --idle --format raw --pid <proxy>` (py-spy pinned to "
            f"core {LOAD_CORE}), during one {self.tool} run each, in the layout of every run: the proxy "
            f"alone on core {SERVER_CORE}, the upstream on core {LOAD_CORE}. py-spy samples wall-clock "
            "stacks, so a process sharing the proxy's core would be charged to whatever frame the proxy "
            f"was preempted in; none does. While sampled: {loads}. The raw profiles are not kept.",
            "",
            "Cost per request, in µs of wall-clock on the proxy's core (samples ÷ rate ÷ requests "
            "served while sampled; blocking py-spy, see the caveat below):",
            "",
            profile.comparison(
                {
                    kind: (summary, load.requests, float(PROFILE_RATE))
                    for kind, (summary, load) in self.profiles.items()
                }
            ),
        ]
        if "sidecar" in self.profiles:
            blocking = self.profiles["sidecar"][0]
            if self.leaves is not None:
                leaves, load = self.leaves
                parts += [
                    "",
                    "**Caveat: a blocking py-spy over-samples system calls.** It stops the process for each "
                    "sample, and the stop lands far more often on a frame that is inside a system call. A "
                    "second run of the same sidecar with `--nonblocking` (which reads the stacks without "
                    "stopping, so stacks can be torn and only their top frame is used) shows it:",
                    "",
                    profile.bias_table(blocking, leaves),
                    "",
                    "So the own-time tables below come from the non-blocking run "
                    f"({load.rps:,.0f} req/s, p50 {load.p50_ms:.2f} ms while sampled), and the inclusive "
                    "table and the per-request parts above from the blocking one, whose stacks are whole "
                    "but whose split leans towards the parts that make system calls.",
                    "",
                    "The sidecar's own time (non-blocking py-spy):",
                    "",
                    profile.own_markdown(leaves, how=" (non-blocking)"),
                ]
            else:
                parts += ["", "The sidecar's own time (blocking py-spy):", "", profile.own_markdown(blocking)]
            parts += ["", profile.inclusive_markdown(blocking)]
        return parts

    def report(self) -> str:
        o = self.o
        policy_sizes = ", ".join(f"{n:,}: {s:.2f} s" for n, s in self.policy_seconds.items())
        parts = [
            f"Command: `{o.command}` (from the repository root, in the project's virtualenv), "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.",
            "",
            "Machine: " + machine(self.tool) + ".",
            "",
            "Cores: " + core_layout() + ".",
            "",
            f"Load: {self.tool}, {o.connections} keep-alive connections, `GET /hello` with `X-API-Key` "
            "taking the next customer's key on every request. Each proxy process is started fresh for "
            f"its customer count, warmed up for {o.warmup:g} s, then measured twice for {o.duration:g} s: "
            "**saturated** (each connection sends its next request as soon as the answer is in: the "
            f"proxy's capacity) and **paced** (each connection waits {_pace_words(o.pace)} before every "
            "request, so after every answer: "
            + (
                "wrk's `delay()` returning `math.random(min, max)`, seeded in each wrk thread"
                if self.tool == "wrk"
                else "one seeded `random.Random` in bench.pyload"
            )
            + f"; {o.connections} connections then offer at most about "
            f"{o.connections * 1000 / ((o.pace[0] + o.pace[1]) / 2):,.0f} req/s, which holds the rate below "
            "either proxy's saturated capacity, so there is less queueing, and the random waits keep the "
            "connections from falling into step; how busy the proxy's core still is at that rate is in the "
            "CPU table below). "
            "The sidecar's policy: one `count` meter, one feature, one plan with a month "
            "quota of 10¹² and a per-second limit of 10⁹ (so nothing is refused, but both limits are "
            "checked and charged on every request), N customers with one key each; generated in "
            f"{policy_sizes}.",
            "",
            "### Saturated",
            "",
            self.table("saturated"),
            "",
            "### Paced",
            "",
            self.table("paced"),
            "",
            *self.extra_sections(),
            f"### Targets (at {o.connections} connections)",
            "",
            self.targets(),
            "",
            "### Details (measured windows only)",
            "",
            self.details(),
            "",
            "### How the columns are measured",
            "",
            "- req/s, p50, p99, non-2xx, socket errors: from the load generator (wrk counts a status "
            "≥ 400 as non-2xx, so a 503 from a store timeout would land there).",
            "- EVALSHA per admitted: the delta of `cmdstat_evalsha` + `cmdstat_eval` calls in Redis "
            "`INFO commandstats` over the measured window, divided by the delta of "
            '`sidecar_requests_total{decision="admitted"}`. Redis counts commands, not round trips: a '
            "pipeline of k commands counts k.",
            "- round trips per admitted, EVALSHA per round trip: the sidecar's own "
            "`sidecar_store_round_trips_total` (pipelines its batcher wrote) and "
            "`sidecar_store_script_calls_total` over the window: the calls of one event-loop turn share "
            "one round trip.",
            "- Redis commands per admitted: every command Redis counted in the window except the bench's "
            "own `INFO`, divided the same way. `commandstats` also counts each command a Lua script runs "
            "inside Redis (`TIME`, `GET`, `LINDEX`, ...): those cost Redis CPU but no round trip. The "
            "sidecar's only other command is the stored-customer version poll, one `GET` a second, off "
            "the hot path.",
            "- proxy / upstream CPU µs/req: the process's utime + stime delta (`/proc/<pid>/stat`) over the "
            "window, divided by requests (admitted for the sidecar, completed for bare).",
            "- Redis CPU µs per admitted (redis-server CPU µs/req): the delta of `used_cpu_user` + "
            "`used_cpu_sys` in Redis `INFO cpu` (the whole redis-server process) over the measured "
            "window, divided the same way. The window starts and ends 0.5 s outside the load, so it "
            "includes a second of the sidecar's idle version poll and the bench's own `INFO`s.",
            "- load generator CPU µs/req: its utime + stime (rusage, once it exited) over its whole run, "
            "divided by the requests it completed.",
            "- saturated added p50 explained by the ratio (Targets): with C connections each sending its "
            "next request as soon as the answer is in, Little's law makes the mean latency C ÷ req/s, so "
            "a slower proxy adds C ÷ req/s(sidecar) - C ÷ req/s(bare) by queueing alone.",
            "- overhead before forwarding: `sidecar_overhead_seconds` (sum ÷ count) from the sidecar's own "
            "`/metrics`: routing, identity and the store round trip, including any wait for the event loop.",
            "- peak RSS: `VmHWM` of the proxy process from `/proc/<pid>/status` when its runs end, so it "
            "includes loading the policy at startup. startup s: from spawning the process to its proxy "
            "port accepting connections (for the sidecar, loading and validating the policy included).",
        ]
        if self.profiles:
            parts += self.profile_section()
        if self.notes:
            parts += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(parts)


def _warmup(run: Run) -> str:
    if run.warmup_non_2xx < 0:
        return "—"
    return f"{run.warmup_non_2xx}" + (f" ({run.warmup_decisions})" if run.warmup_decisions else "")


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ceiling(us_per_request: float | None, cores_in_use: int = 1) -> str:
    """Cores times 10⁶ ÷ µs per request: the req/s those cores can serve at that cost."""
    if not us_per_request:
        return "—"
    return f"{cores_in_use * 1e6 / us_per_request:,.0f}"


def _little_ms(connections: int, rps: float) -> float:
    """Little's law for a closed loop without waits: mean latency = connections ÷ throughput."""
    return connections / rps * 1e3 if rps else 0.0


def _marks(checks: list[tuple[str, bool]]) -> str:
    return "; ".join(f"{text} **{'met' if ok else 'missed'}**" for text, ok in checks)


def _pace_words(pace: Pace) -> str:
    low, high = pace
    if low == high:
        return f"{low} ms"
    return (
        f"a whole number of milliseconds drawn uniformly from {low} to {high} (mean {(low + high) / 2:g} ms)"
    )


def _cores_text(placement: tuple[int, ...]) -> str:
    if not placement:
        return "the one core"
    return f"core{'s' if len(placement) > 1 else ''} {core_list(placement)}"


def machine(tool: str) -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    server = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True).stdout
    server_version = re.search(r"v=(\S+)", server)
    parts = [
        f"`nproc` {os.cpu_count()} ({cores()} usable), {model}",
        f"Linux {platform.release()}",
        f"Python {platform.python_version()}",
        f"aiohttp {aiohttp.__version__}",
        f"redis-py {redis.__version__}",
        f"redis-server {server_version[1] if server_version else '?'}",
    ]
    if tool == "wrk":
        wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        first = (wrk.stdout or wrk.stderr).splitlines()
        parts.append(first[0].split(" [")[0] if first else "wrk")
    if uvloop is None:
        parts.append("no uvloop")
    else:
        parts.append(f"uvloop {getattr(uvloop, '__version__', '?')} (the uvloop rows: `--loop uvloop`)")
    return ", ".join(parts)


def core_layout() -> str:
    if not pinning_available():
        return "one usable core, so nothing is pinned and every process shares it"
    how = "`taskset`" if shutil.which("taskset") else "`sched_setaffinity`"
    placement = worker_cores(SCALE_WORKERS)
    return (
        f"pinned with {how}, the same for every run (bare, sidecar, uvloop, refusals, soak, profiles). "
        f"Core {SERVER_CORE}: the proxy under test, alone. Core {LOAD_CORE}: the load generator (one "
        "thread), the upstream (sidecar.runtime.demo's aiohttp app, `GET /hello` answers a small JSON "
        "body), redis-server, py-spy and the bench script. So the proxy's CPU per request alone sets its "
        f"core's ceiling, and core {LOAD_CORE} carries the rest (both in the CPU table). The exceptions: "
        f"the Workers runs, whose sidecar may run on {_cores_text(placement)}, and the store call alone, "
        f"on core {SERVER_CORE} while nothing else runs there"
    )


def worker_cores(workers: int) -> tuple[int, ...]:
    """Where the Workers runs' sidecar may run: `workers` cores other than the load's when there are
    that many, else every usable core, the load's included; () (not pinned) with one core."""
    if not pinning_available():
        return ()
    spare = [core for core in allowed_cores() if core != LOAD_CORE]
    if len(spare) >= workers:
        return tuple(spare[:workers])
    return allowed_cores()


def write_report(path: Path, generated: str) -> None:
    """Replace the generated part of BENCHMARKS.md (between the markers); keep the rest."""
    block = f"{BEGIN}\n{generated}\n{END}"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        path.write_text(head + block + tail)
    else:
        path.write_text(f"# Benchmarks\n\n## Results\n\n{block}\n")


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 customer, 1 s warm-up, 5 s runs, no uvloop rows, no extras, no profile",
    )
    parser.add_argument("--customers", default=None, help="comma-separated counts (default 1,1000,100000)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per process (default 2)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--pace",
        default=pace_text(DEFAULT_PACE),
        help="paced runs: MIN-MAX whole ms, drawn uniformly, waited after each answer (default 25-75)",
    )
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--no-profile", action="store_true", help="skip the two py-spy runs")
    parser.add_argument("--no-uvloop", action="store_true", help="skip the uvloop runs")
    parser.add_argument(
        "--no-extras", action="store_true", help="skip the workers runs, the refusal run and the soak"
    )
    parser.add_argument("--soak-runs", type=int, default=4, help="runs of --duration in the soak (1-10)")
    parser.add_argument(
        "--output",
        default=None,
        help="Markdown file to update (default BENCHMARKS.md for a full run; none with --quick)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--keep-profile", default=None, help="copy py-spy's raw profiles beside this path")
    parser.add_argument(
        "--budget", type=float, default=480.0, help="seconds before the whole bench is stopped"
    )
    args = parser.parse_args(argv)
    customers = [int(c) for c in (args.customers or ("1" if args.quick else "1,1000,100000")).split(",")]
    duration = args.duration if args.duration is not None else (5.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    if duration + warmup > 15 or duration < 1 or warmup < 0:
        parser.error("a run is bounded to 15 s: --warmup + --duration must not exceed it (--duration ≥ 1)")
    if min(customers) < 1 or max(customers) > 1_000_000:
        parser.error("--customers: each count must be between 1 and 1,000,000")
    if not 1 <= args.connections <= 1000:
        parser.error("--connections must be between 1 and 1000")
    try:
        pace = parse_pace(args.pace)
    except ValueError as error:
        parser.error(f"--pace: {error}")
    if not 1 <= args.soak_runs <= 10:
        parser.error("--soak-runs must be between 1 and 10")
    output: Path | None = None
    if not args.no_write:
        if args.output is not None:
            output = Path(args.output)
        elif not args.quick:
            output = ROOT / "BENCHMARKS.md"
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    return Options(
        customers=customers,
        warmup=warmup,
        duration=duration,
        connections=args.connections,
        pace=pace,
        loadgen=args.loadgen,
        profile=not args.no_profile and not args.quick,
        uvloop=not args.no_uvloop and not args.quick,
        extras=not args.no_extras and not args.quick,
        soak_runs=args.soak_runs,
        output=output,
        keep_profile=None if args.keep_profile is None else Path(args.keep_profile),
        budget=args.budget,
        command=command,
    )


def _raise_budget(signum: int, frame: object) -> None:
    raise BudgetExceeded("the bench ran over its --budget and was stopped")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if LOAD_CORE is not None:
        os.sched_setaffinity(0, {LOAD_CORE})  # keep this script off the proxy's core
    signal.signal(signal.SIGALRM, _raise_budget)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.alarm(int(options.budget))
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    bench = Bench(options, workdir)
    started = time.monotonic()
    try:
        bench.run()
    except (BudgetExceeded, KeyboardInterrupt, RuntimeError, OSError, redis.RedisError) as error:
        print(f"bench stopped: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        stop_all()
        if bench.redis is not None:
            bench.redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    generated = bench.report()
    print()
    print(generated)
    print(f"\n(the bench took {time.monotonic() - started:.0f} s)")
    if options.output is not None:
        write_report(options.output, generated)
        print(f"wrote {options.output}")
    return 0
