"""The load: wrk when it is installed, else bench.pyload; either way a closed loop of N keep-alive
connections for a fixed time, each request carrying the next customer's key in X-API-Key.

Saturated (the default): each connection sends its next request as soon as the answer is in.
Paced (`pace_ms`): each connection waits that long after every answer (wrk's `delay()`), which
holds the rate below what either proxy can serve, so latency is the time a request takes rather
than the time it queues (Little's law: at saturation p50 ≈ connections ÷ req/s).

Both print one line `BENCH_JSON {...}` with requests, duration, latency percentiles (ms) and
errors (non-2xx/3xx statuses, and socket errors), parsed here into a LoadResult.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import run_bounded

# Each thread starts at its own offset into the key list and steps through it; done() runs once,
# in its own Lua state, with the merged summary and latency histogram (microseconds).
WRK_SCRIPT = r"""
local requests = {}
local n, i = 0, 0

function init(args)
  for key in io.lines(args[1]) do
    n = n + 1
    requests[n] = wrk.format("GET", "/hello", {["X-API-Key"] = key})
  end
  i = tonumber(args[2] or "0") % n
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

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


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
    core: int | None,
    workdir: Path,
    pace_ms: float = 0.0,
) -> LoadResult:
    """One closed-loop run of `seconds` against `url` (its path is /hello)."""
    if tool == "wrk":
        script = workdir / ("rotate_keys_paced.lua" if pace_ms else "rotate_keys.lua")
        pace = f"function delay()\n  return {pace_ms:g}\nend" if pace_ms else ""
        script.write_text(WRK_SCRIPT.replace("PACE_FUNCTION", pace))
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
            "--pace-ms",
            str(pace_ms),
        ]
    data = parse_result(run_bounded(argv, core=core, timeout=seconds + 20), tool)
    socket_errors = sum(data.pop("socket_errors").values())
    return LoadResult(tool=tool, socket_errors=socket_errors, **data)


def parse_result(completed: subprocess.CompletedProcess[str], name: str) -> dict[str, Any]:
    """The `BENCH_JSON {...}` line a measuring child printed."""
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return dict(json.loads(line.removeprefix("BENCH_JSON ")))
    raise RuntimeError(f"{name} printed no result (exit {completed.returncode}): {completed.stderr[-2000:]}")
