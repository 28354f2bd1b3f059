"""`python -m bench`: the bare proxy and the sidecar under the same load, side by side.

Everything binds 127.0.0.1. Each proxy process serves one warm-up and two measured load runs
(saturated, then paced), each at most `--warmup` / `--duration` seconds (2 s and 10 s by
default, never over 15 s together); the whole bench is stopped by an alarm after `--budget`
seconds, and every process it started is stopped (SIGTERM, then SIGKILL) on the way out.

Cores (with two or more; with one, nothing is pinned):
  core 0: the load generator (wrk -t1 or bench.pyload), redis-server, py-spy, this script
  core 1: the proxy under test (bare or sidecar), the upstream
For the two profiled runs only, a second upstream runs on core 0, so that the proxy has core 1 to
itself and the profile shows the proxy's own time.
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

from bench import profile
from bench.loadgen import LoadResult, choose_tool, drive
from bench.policy import api_key, write_keys, write_policy
from bench.procs import Proc, allowed_cores, cores, free_port, pin_existing, pinning_available, stop_all
from sidecar.store.embedded import EmbeddedRedis, redis_server_binary

# The first two CPUs this process may use: the load generator's and the servers'.
LOAD_CORE, SERVER_CORE = allowed_cores()[:2] if pinning_available() else (None, None)
ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:begin (written by `python -m bench`) -->", "<!-- bench:end -->"
SIDECAR_STARTUP_TIMEOUT = 180.0
# After a load run, requests the generator gave up on at its deadline are still finishing; the
# counters are read once they have, so Redis's and the sidecar's agree.
SETTLE_SECONDS = 0.5
PROFILE_RATE = 100  # py-spy samples per second
TARGET_RATIO, TARGET_P50_MS, TARGET_P99_MS, TARGET_ROUND_TRIPS = 0.9, 0.3, 2.0, 1.0
MODES = ("saturated", "paced")


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


@dataclass
class Run:
    proxy: str  # "bare" or "sidecar"
    customers: int
    mode: str  # "saturated" or "paced"
    load: LoadResult
    before: Snapshot
    after: Snapshot
    startup_s: float = 0.0
    peak_rss_kib: int = 0
    rss_kib: int = 0
    exit_code: int | None = None

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
        requests = self.admitted if self.proxy == "sidecar" else self.load.requests
        return value / requests if requests else None

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
    def overhead_mean_ms(self) -> float | None:
        count = self.after.overhead_count - self.before.overhead_count
        return (self.after.overhead_sum - self.before.overhead_sum) / count * 1e3 if count else None


# ---------------------------------------------------------------------------------------------
# Reading the processes


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def read_metrics(admin_port: int) -> tuple[dict[str, float], float, float, float]:
    """From the sidecar's /metrics: requests by decision, overhead sum and count, store errors."""
    text = _get(f"http://127.0.0.1:{admin_port}/metrics").decode()
    decisions: dict[str, float] = {}
    overhead_sum = overhead_count = store_errors = 0.0
    for line in text.splitlines():
        value = line.rsplit(" ", 1)[-1]
        if line.startswith("sidecar_requests_total{"):
            decision = re.search(r'decision="([^"]*)"', line)
            if decision:
                decisions[decision[1]] = decisions.get(decision[1], 0.0) + float(value)
        elif line.startswith("sidecar_overhead_seconds_sum"):
            overhead_sum = float(value)
        elif line.startswith("sidecar_overhead_seconds_count"):
            overhead_count = float(value)
        elif line.startswith("sidecar_store_errors_total{"):
            store_errors += float(value)
    return decisions, overhead_sum, overhead_count, store_errors


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
        shot.decisions, shot.overhead_sum, shot.overhead_count, shot.store_errors = read_metrics(admin_port)
    return shot


# ---------------------------------------------------------------------------------------------
# The bench


@dataclass
class Options:
    customers: list[int]
    warmup: float
    duration: float
    connections: int
    pace_ms: float
    loadgen: str
    profile: bool
    output: Path | None
    keep_profile: Path | None
    budget: float
    command: str


class Bench:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.o = options
        self.workdir = workdir
        self.tool = choose_tool(options.loadgen)
        self.runs: list[Run] = []
        self.profiles: dict[str, tuple[profile.Summary, LoadResult]] = {}
        self.policy_seconds: dict[int, float] = {}
        self.notes: list[str] = []
        self.redis: EmbeddedRedis | None = None

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def run(self) -> None:
        self.redis = EmbeddedRedis(self.workdir / "redis", persistent=False)
        self.redis_url = self.redis.start()
        assert self.redis.pid is not None
        pin_existing(self.redis.pid, LOAD_CORE)
        self.store = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        self.upstream, self.upstream_url = self.start_upstream("upstream", SERVER_CORE)
        self.log(
            f"redis-server {self.redis_url} (pid {self.redis.pid}), upstream {self.upstream_url}; load: {self.tool}"
        )
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
        if self.o.profile:
            self.run_profiles()

    def start_upstream(self, name: str, core: int | None) -> tuple[Proc, str]:
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
        self, kind: str, policy: Path, name: str, upstream_url: str
    ) -> tuple[Proc, int, int | None, float]:
        """Start a proxy and wait for it; a port taken between the probe and the bind is retried."""
        for attempt in range(3):
            try:
                return self._start_proxy(kind, policy, name, upstream_url)
            except RuntimeError as error:
                if "address already in use" not in str(error) or attempt == 2:
                    raise
                self.log(f"{name}: its port was taken before it could bind; starting it again")
        raise AssertionError("unreachable")

    def _start_proxy(
        self, kind: str, policy: Path, name: str, upstream_url: str
    ) -> tuple[Proc, int, int | None, float]:
        port = free_port()
        admin: int | None = None
        if kind == "bare":
            argv = [
                sys.executable, "-m", "bench.bare_proxy",
                "--listen", f"127.0.0.1:{port}", "--upstream", upstream_url,
            ]  # fmt: skip
            timeout = 30.0
        else:
            admin = free_port()
            argv = [
                sys.executable, "-m", "sidecar", "run",
                "--redis", self.redis_url, "--upstream", upstream_url,
                "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                "--policies", str(policy), "--log-level", "WARNING", "--drain-timeout", "5",
            ]  # fmt: skip
            timeout = SIDECAR_STARTUP_TIMEOUT
        proc = Proc(name, argv, core=SERVER_CORE, log=self.workdir / f"{name}.log")
        startup = proc.wait_listening(port, timeout)
        # One request by hand: the key works and the whole chain answers 200.
        body = _get(f"http://127.0.0.1:{port}/hello", {"X-API-Key": api_key(0)})
        if kind == "sidecar" and b"customer-0" not in body:
            raise RuntimeError(f"unexpected first answer from the sidecar: {body[:200]!r}")
        return proc, port, admin, startup

    def load(self, url: str, keys: Path, seconds: float, pace_ms: float = 0.0) -> LoadResult:
        return drive(
            self.tool, url, keys=keys, connections=self.o.connections, seconds=seconds,
            core=LOAD_CORE, workdir=self.workdir, pace_ms=pace_ms,
        )  # fmt: skip

    def measure(self, kind: str, customers: int, policy: Path, keys: Path) -> list[Run]:
        """One proxy process: a warm-up, then a saturated and a paced measured run."""
        proc, port, admin, startup = self.start_proxy(kind, policy, f"{kind}-{customers}", self.upstream_url)
        self.log(f"{kind} ({customers} customers) listening after {startup:.2f}s, pid {proc.pid}")
        runs = []
        try:
            url = f"http://127.0.0.1:{port}/hello"
            self.load(url, keys, self.o.warmup)
            for mode in MODES:
                time.sleep(SETTLE_SECONDS)
                before = snapshot(self.store, proc, self.upstream, admin)
                load = self.load(url, keys, self.o.duration, self.o.pace_ms if mode == "paced" else 0.0)
                time.sleep(SETTLE_SECONDS)
                after = snapshot(self.store, proc, self.upstream, admin)
                run = Run(kind, customers, mode, load, before, after, startup)
                runs.append(run)
                extra = (
                    f", EVALSHA/admitted {_fmt(run.per_request(run.scripts), 3)}" if kind == "sidecar" else ""
                )
                self.log(
                    f"{kind} ({customers} customers, {mode}): {load.rps:.0f} req/s, p50 {load.p50_ms:.2f} ms, "
                    f"p99 {load.p99_ms:.2f} ms, non-2xx {load.non_2xx}, socket errors {load.socket_errors}{extra}"
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
            f"{kind} ({customers} customers) stopped, exit {exit_code}, peak RSS {runs[0].peak_rss_kib / 1024:.0f} MiB"
        )
        return runs

    def run_profiles(self) -> None:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(pyspy).exists():
            self.notes.append("py-spy is not installed (`pip install py-spy`): no profile was taken.")
            self.log("py-spy not found: no profile")
            return
        upstream, upstream_url = self.start_upstream("upstream-profiled", LOAD_CORE)
        try:
            for kind in ("bare", "sidecar"):
                self.run_profile(kind, pyspy, upstream_url)
        finally:
            upstream.stop()

    def run_profile(self, kind: str, pyspy: str, upstream_url: str) -> None:
        """One proxy with 1 customer under py-spy for one saturated load run."""
        directory = self.workdir / f"profile-{kind}"
        directory.mkdir()
        policy, keys = write_policy(directory, 1), write_keys(directory, 1)
        proc, port, _, _ = self.start_proxy(kind, policy, f"{kind}-profiled", upstream_url)
        output = directory / "profile.txt"
        seconds = self.o.duration
        try:
            url = f"http://127.0.0.1:{port}/hello"
            self.load(url, keys, self.o.warmup)
            spy = Proc(
                "py-spy",
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(proc.pid),
                    "--duration",
                    str(round(seconds)),
                    "--rate",
                    str(PROFILE_RATE),
                    "--idle",
                    "--format",
                    "raw",
                    "-o",
                    str(output),
                ],  # fmt: skip
                core=LOAD_CORE,
                log=self.workdir / f"py-spy-{kind}.log",
            )
            self.log(f"profiling {kind} (pid {proc.pid}) with py-spy for {seconds:.0f}s")
            load = self.load(url, keys, seconds)
            deadline = time.monotonic() + 20
            while spy.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            spy.stop()
        finally:
            proc.stop()
        if not output.exists():
            self.notes.append(f"py-spy wrote no profile of {kind}: {spy.log_tail(500)}")
            return
        if self.o.keep_profile is not None:
            shutil.copyfile(output, self.o.keep_profile.with_name(f"{kind}-{self.o.keep_profile.name}"))
        self.profiles[kind] = (profile.summarise(output.read_text()), load)
        self.log(
            f"profiled {kind}: {load.rps:.0f} req/s, p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms "
            f"(py-spy samples at {PROFILE_RATE} Hz, pausing the process for each sample)"
        )

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
            "| added p50 ms | added p99 ms | EVALSHA per admitted | Redis commands per admitted "
            "(incl. inside the script) | proxy CPU µs/req | peak RSS MiB | startup s |",
            "|---:|---|" + "---:|" * 13,
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
                    _fmt(run.per_request(run.all_commands), 2) if is_side else "—",
                    _fmt(run.proxy_cpu_us, 0),
                    f"{run.peak_rss_kib / 1024:.0f}",
                    f"{run.startup_s:.2f}",
                ]
                lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def details(self) -> str:
        lines = [
            "| customers | load | admitted (sidecar metrics) | other decisions | store errors "
            "| overhead before forwarding, mean ms | redis-server CPU µs/req | RSS at end MiB | exit code |",
            "|---:|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for mode in MODES:
            for _, side in self.pairs(mode):
                others = {
                    k: side.decided(k) for k in side.after.decisions if k != "admitted" and side.decided(k)
                }
                lines.append(
                    f"| {side.customers:,} | {mode} | {side.admitted:,} | {others or 'none'} "
                    f"| {side.after.store_errors - side.before.store_errors:.0f} "
                    f"| {_fmt(side.overhead_mean_ms, 3)} | {_fmt(side.redis_cpu_us, 1)} "
                    f"| {side.rss_kib / 1024:.0f} | {side.exit_code} |"
                )
        lines += [
            "",
            f"CPU per request on core {SERVER_CORE} (utime + stime from `/proc/<pid>/stat`). The proxy and "
            "the upstream share that core, so when it is saturated, req/s ≈ 10⁶ ÷ their sum:",
            "",
            "| customers | load | proxy | proxy CPU µs/req | upstream CPU µs/req | sum | 10⁶ ÷ sum | measured req/s |",
            "|---:|---|---|---:|---:|---:|---:|---:|",
        ]
        for run in self.runs:
            total = (run.proxy_cpu_us or 0.0) + (run.upstream_cpu_us or 0.0)
            lines.append(
                f"| {run.customers:,} | {run.mode} | {run.proxy} | {_fmt(run.proxy_cpu_us, 0)} "
                f"| {_fmt(run.upstream_cpu_us, 0)} | {total:.0f} | {1e6 / total if total else 0:,.0f} "
                f"| {run.load.rps:,.0f} |"
            )
        lines += [
            "",
            "Redis commands per admitted request, by name (`INFO commandstats`, saturated runs):",
            "",
        ]
        lines += [
            f"- {side.customers:,} customers: {side.breakdown()}" for _, side in self.pairs("saturated")
        ]
        return "\n".join(lines)

    def targets(self) -> str:
        lines = []
        paced = {side.customers: (bare, side) for bare, side in self.pairs("paced")}
        for bare, side in self.pairs("saturated"):
            ratio = side.load.rps / bare.load.rps if bare.load.rps else 0.0
            trips = side.per_request(side.scripts) or 0.0
            checks = [
                (f"throughput {ratio:.2f}× bare (≥ {TARGET_RATIO}×)", ratio >= TARGET_RATIO),
            ]
            for mode, (b, s) in (("saturated", (bare, side)), ("paced", paced.get(side.customers))):
                if s is None:
                    continue
                added50, added99 = s.load.p50_ms - b.load.p50_ms, s.load.p99_ms - b.load.p99_ms
                checks += [
                    (f"added p50 {mode} {added50:+.2f} ms (≤ {TARGET_P50_MS} ms)", added50 <= TARGET_P50_MS),
                    (f"added p99 {mode} {added99:+.2f} ms (≤ {TARGET_P99_MS} ms)", added99 <= TARGET_P99_MS),
                ]
            checks.append(
                (
                    f"{trips:.3f} EVALSHA per admitted request (≤ {TARGET_ROUND_TRIPS:g})",
                    trips <= TARGET_ROUND_TRIPS,
                )
            )
            marks = "; ".join(f"{text} **{'met' if ok else 'missed'}**" for text, ok in checks)
            lines.append(f"- {side.customers:,} customers: {marks}.")
        return "\n".join(lines)

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
            f"proxy's capacity) and **paced** (each connection waits {o.pace_ms:g} ms after every answer, "
            "which holds the rate well below either proxy's capacity, so latency is service time rather "
            "than queueing). The sidecar's policy: one `count` meter, one feature, one plan with a month "
            "quota of 10¹² and a per-second limit of 10⁹ (so nothing is refused, but both limits are "
            f"checked and charged on every request), N customers with one key each; generated in {policy_sizes}.",
            "",
            "### Saturated",
            "",
            self.table("saturated"),
            "",
            "### Paced",
            "",
            self.table("paced"),
            "",
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
            "pipeline of k commands would count k. The sidecar does not pipeline on the hot path (it "
            "awaits one EVALSHA per request), so here commands and round trips are the same number.",
            "- Redis commands per admitted: every command Redis counted in the window except the bench's "
            "own `INFO`, divided the same way. `commandstats` also counts each command a Lua script runs "
            "inside Redis (`TIME`, `GET`, `LINDEX`, ...): those cost Redis CPU but no round trip. The "
            "sidecar's only other command is the stored-customer version poll, one `GET` a second, off "
            "the hot path.",
            "- proxy / upstream CPU µs/req: the process's utime + stime delta (`/proc/<pid>/stat`) over the "
            "window, divided by requests (admitted for the sidecar, completed for bare).",
            "- overhead before forwarding: `sidecar_overhead_seconds` (sum ÷ count) from the sidecar's own "
            "`/metrics`: routing, identity and the store round trip, including any wait for the event loop.",
            "- peak RSS: `VmHWM` of the proxy process from `/proc/<pid>/status` when its runs end, so it "
            "includes loading the policy at startup. startup s: from spawning the process to its proxy "
            "port accepting connections (for the sidecar, loading and validating the policy included).",
        ]
        if self.profiles:
            loads = ", ".join(
                f"{kind} {load.rps:,.0f} req/s (p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms)"
                for kind, (_, load) in self.profiles.items()
            )
            parts += [
                "",
                f"### Profiles: 1 customer, {o.duration:g} s saturated",
                "",
                f"`py-spy record --rate {PROFILE_RATE} --idle --format raw --pid <proxy>` (py-spy pinned to "
                f"core {LOAD_CORE}), during one {self.tool} run each. For these two runs the upstream is a "
                f"second one on core {LOAD_CORE}, so the proxy has core {SERVER_CORE} to itself: py-spy "
                "samples wall-clock stacks, and an upstream sharing the core would be charged to whatever "
                f"frame the proxy was preempted in. While sampled: {loads}. The raw profiles are not kept.",
                "",
                "Cost per request, in µs of wall-clock on the proxy's core (samples ÷ rate ÷ requests "
                "served while sampled):",
                "",
                profile.comparison(
                    {
                        kind: (summary, load.requests, float(PROFILE_RATE))
                        for kind, (summary, load) in self.profiles.items()
                    }
                ),
            ]
            if "sidecar" in self.profiles:
                parts += ["", "The sidecar's profile:", "", profile.markdown(self.profiles["sidecar"][0])]
        if self.notes:
            parts += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(parts)


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


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
    try:
        import uvloop  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        parts.append("no uvloop (the sidecar runs the default asyncio loop)")
    return ", ".join(parts)


def core_layout() -> str:
    if not pinning_available():
        return "one usable core, so nothing is pinned and every process shares it"
    how = "`taskset`" if shutil.which("taskset") else "`sched_setaffinity`"
    return (
        f"pinned with {how}. Core {LOAD_CORE}: the load generator (one thread), redis-server, py-spy "
        f"and the bench script. Core {SERVER_CORE}: the proxy under test and the upstream "
        "(sidecar.demo's aiohttp app, `GET /hello` answers a small JSON body), so the proxy and the "
        "upstream share one core and their CPU per request adds up"
    )


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
    parser.add_argument("--quick", action="store_true", help="1 customer, 1 s warm-up, 5 s runs, no profile")
    parser.add_argument("--customers", default=None, help="comma-separated counts (default 1,1000,100000)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per process (default 2)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--pace-ms", type=float, default=50.0, help="paced runs: wait after each answer")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--no-profile", action="store_true", help="skip the two py-spy runs")
    parser.add_argument(
        "--output",
        default=None,
        help="Markdown file to update (default BENCHMARKS.md for a full run; none with --quick)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--keep-profile", default=None, help="copy py-spy's raw profiles beside this path")
    parser.add_argument(
        "--budget", type=float, default=330.0, help="seconds before the whole bench is stopped"
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
    if not 0 < args.pace_ms <= 1000:
        parser.error("--pace-ms must be above 0 and at most 1000")
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
        pace_ms=args.pace_ms,
        loadgen=args.loadgen,
        profile=not args.no_profile and not args.quick,
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
