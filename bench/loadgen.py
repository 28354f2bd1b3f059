"""The load: wrk when it is installed, else bench.pyload; either way a closed loop of N keep-alive
connections for a fixed time, each request carrying the next customer's key in X-API-Key.

Saturated (the default): each connection sends its next request as soon as the answer is in.
Paced (`pace`, (min, max) ms): each connection waits a whole number of milliseconds drawn
uniformly from min to max (both included) before every request, so after every answer (wrk's
`delay()` with `math.random`, seeded in each wrk thread from `seed` and the thread's number;
bench.pyload the same with one `random.Random(seed)`). That holds the rate below what either proxy
can serve, so latency is the time a request takes rather than the time it queues (Little's law: at
saturation, mean latency = connections ÷ req/s), and the random waits keep the connections from
falling into step with each other.

Both print one line `BENCH_JSON {...}` with requests, duration, latency percentiles (ms) and
errors (non-2xx/3xx statuses, and socket errors), parsed here into a LoadResult, with the load
generator's own CPU seconds (its rusage once it has exited).
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Cores, run_bounded

DEFAULT_SEED = 14

# Each thread starts at its own offset into the key list and steps through it; done() runs once,
# in its own Lua state, with the merged summary and latency histogram (microseconds). setup()
# runs in the main Lua state once per thread, before init() runs in the thread's own state.
WRK_SCRIPT = r"""
local requests = {}
local n, i = 0, 0
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

function init(args)
  for key in io.lines(args[1]) do
    n = n + 1
    requests[n] = wrk.format("GET", "/hello", {["X-API-Key"] = key})
  end
  i = tonumber(args[2] or "0") % n
  if pace_init then pace_init() end
end

PACE_FUNCTION

function request()
  i = i + 1
  if i > n then i = 1 end
  return requests[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_s": %.6f, "p50_ms": %.4f, "p90_ms": %.4f, ' ..
    '"p99_ms": %.4f, "max_ms": %.4f, "mean_ms": %.4f, "non_2xx": %d, ' ..
    '"socket_errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}}\n',
    summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, latency.mean / 1e3, e.status,
    e.connect, e.read, e.write, e.timeout))
end
"""


@dataclass(frozen=True)
class LoadResult:
    tool: str
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    non_2xx: int
    socket_errors: int
    cpu_s: float = 0.0  # the load generator's utime + stime over its whole run

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def cpu_us(self) -> float | None:
        """The load generator's CPU per request it completed, µs."""
        return self.cpu_s / self.requests * 1e6 if self.requests else None


Pace = tuple[int, int]  # (min, max) ms waited before each request; None: saturated


def parse_pace(text: str) -> Pace:
    """`25-75` (or `50`, a fixed wait): whole milliseconds, 1 ≤ min ≤ max ≤ 1000."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if match is None:
        raise ValueError(f"{text!r} is not MIN-MAX in whole milliseconds (such as 25-75)")
    low = int(match[1])
    high = int(match[2]) if match[2] is not None else low
    if not 1 <= low <= high <= 1000:
        raise ValueError(f"{text!r}: need 1 ≤ MIN ≤ MAX ≤ 1000 ms")
    return low, high


def pace_text(pace: Pace) -> str:
    low, high = pace
    return f"{low}" if low == high else f"{low}-{high}"


def wrk_pace(pace: Pace | None, seed: int) -> str:
    """wrk's delay(): integer ms (wrk truncates a fraction), uniform over [min, max]."""
    if pace is None:
        return ""
    low, high = pace
    return (
        f"function pace_init()\n  math.randomseed({seed} + 7919 * (thread_number or 1))\nend\n\n"
        f"function delay()\n  return math.random({low}, {high})\nend"
    )


def choose_tool(preference: str) -> str:
    if preference == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("--loadgen wrk: wrk is not installed (apt-get install -y wrk)")
    if preference == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    return preference


def drive(
    tool: str,
    url: str,
    *,
    keys: Path,
    connections: int,
    seconds: float,
    core: Cores,
    workdir: Path,
    pace: Pace | None = None,
    seed: int = DEFAULT_SEED,
) -> LoadResult:
    """One closed-loop run of `seconds` against `url` (its path is /hello)."""
    if tool == "wrk":
        script = workdir / ("rotate_keys_paced.lua" if pace else "rotate_keys.lua")
        script.write_text(WRK_SCRIPT.replace("PACE_FUNCTION", wrk_pace(pace, seed)))
        argv = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            url,
            "--",
            str(keys),
            "0",
        ]
    else:
        argv = [
            sys.executable,
            "-m",
            "bench.pyload",
            "--url",
            url,
            "--keys",
            str(keys),
            "--connections",
            str(connections),
            "--seconds",
            str(seconds),
            "--seed",
            str(seed),
            *(["--pace", pace_text(pace)] if pace else []),
        ]
    before = _children_cpu()
    completed = run_bounded(argv, core=core, timeout=seconds + 20)
    cpu_s = _children_cpu() - before
    data = parse_result(completed, tool)
    socket_errors = sum(data.pop("socket_errors").values())
    return LoadResult(tool=tool, socket_errors=socket_errors, cpu_s=cpu_s, **data)


def _children_cpu() -> float:
    """utime + stime of this process's children that have exited and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse_result(completed: subprocess.CompletedProcess[str], name: str) -> dict[str, Any]:
    """The `BENCH_JSON {...}` line a measuring child printed."""
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return dict(json.loads(line.removeprefix("BENCH_JSON ")))
    raise RuntimeError(f"{name} printed no result (exit {completed.returncode}): {completed.stderr[-2000:]}")
