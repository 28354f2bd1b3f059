"""Instructions, not seconds: what one request costs a proxy's process, and what one metering call
costs redis-server, counted by valgrind's callgrind.

Why: on this 2-core machine two runs of the same proxy differ by 15% in req/s, so a change worth
2% cannot be seen in `python -m bench`. callgrind counts the instructions a process executes,
which is the same from run to run whatever else the machine does. It counts user space only:
system calls (the sends and receives every proxy makes) cost time that this does not show, so
these numbers rank changes to Python and Lua; the bench says what they buy in req/s.

    python -m bench.callgrind                    # both tables, about 2 minutes
    python -m bench.callgrind --only redis       # the Redis table only

The proxy table: each proxy runs under callgrind with instrumentation off; after a 2 s warm-up,
it is switched on for a wrk run of `--seconds` (10 connections), then off, and the instructions
are divided by the requests wrk completed. The Redis table: redis-server runs under callgrind
counting only inside EVALSHA; 300 calls of each script with the bench policy's real arguments,
in pipelines of 10. Everything binds 127.0.0.1 and every process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.policy import api_key, policy_text
from bench.procs import Proc, free_port, stop_all
from sidecar.admission.plan import meter_request
from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.model import Policy
from sidecar.store.redis.calls import SHARED_SOURCES, load_script
from sidecar.store.redis.embedded import redis_server_binary
from sidecar.store.redis.store import script_arguments

SCRIPT_CALLS = 300
PIPELINE = 10
# (row, policy variant): the same /hello route, with less and less of the sidecar's work.
PROXIES = (
    ("bare aiohttp proxy (ClientSession)", "bare"),
    ("sidecar, a public route (no key, no metering)", "public"),
    ("sidecar, key and plan checked, no limit (no store call)", "unlimited"),
    ("sidecar, the bench policy (month quota and per-second limit)", "metered"),
)


def policy_variant(variant: str) -> str:
    """The bench policy for one customer, with its route made public or its limits removed."""
    text = policy_text(1)
    if variant == "public":
        text = text.replace("path: /hello}", "path: /hello}, public: true")
        text = text.replace("    features: [hello]\n", "    features: []\n")
    if variant == "unlimited":
        lines = text.splitlines(keepends=True)
        text = "".join(line for line in lines if "period:" not in line and line.strip() != "limits:")
    return text


def callgrind_total(path: Path) -> int:
    """The total instruction count of one callgrind output file."""
    found: dict[str, int] = {}
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            name, value = line.split()[:2]
            found[name] = int(value)
    if not found:
        raise RuntimeError(f"no totals in {path}")
    return found.get("totals:", found.get("summary:", 0))  # a dump's summary line may read 0


def wrk(url: str, seconds: float, script: Path) -> int:
    """Requests completed by wrk (one thread, 10 connections) in `seconds`."""
    out = subprocess.run(
        ["wrk", "-t1", "-c10", f"-d{seconds:g}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    found = re.search(r"(\d+) requests in", out)
    if found is None:
        raise RuntimeError(f"wrk printed no request count: {out[-500:]}")
    return int(found.group(1))


def control(pid: int, *flags: str) -> None:
    subprocess.run(["callgrind_control", *flags, str(pid)], capture_output=True, timeout=60, check=False)


def proxy_instructions(variant: str, work: Path, redis_url: str, upstream: str, seconds: float) -> float:
    """Instructions per request of one proxy process, under a wrk load."""
    policy = work / f"{variant}.yaml"
    policy.write_text(policy_variant(variant))
    port, admin = free_port(), free_port()
    out = work / f"callgrind.{variant}"
    if variant == "bare":
        command = ["-m", "bench.bare_proxy", "--listen", f"127.0.0.1:{port}", "--upstream", upstream]
    else:
        command = [
            *("-m", "sidecar", "run", "--redis", redis_url, "--upstream", upstream),
            *("--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"),
            *("--policies", str(policy), "--log-level", "WARNING", "--drain-timeout", "2"),
            *("--store-timeout", "2"),  # under callgrind a call takes far longer than 50 ms
        ]
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    proc = Proc(variant, [*valgrind, sys.executable, *command], core=None, log=work / f"{variant}.log")
    script = work / "wrk.lua"
    script.write_text(
        f'request = function() return wrk.format("GET", "/hello", {{["X-API-Key"] = "{api_key(0)}"}}) end\n'
    )
    try:
        proc.wait_listening(port, 120)
        url = f"http://127.0.0.1:{port}/hello"
        wrk(url, 2, script)  # warm-up, not counted
        control(proc.pid, "-i", "on")
        requests = wrk(url, seconds, script)
        control(proc.pid, "-i", "off")
        control(proc.pid, "-d")
    finally:
        proc.stop()
    dumps = sorted(work.glob(f"callgrind.{variant}.*"))
    return sum(callgrind_total(dump) for dump in dumps) / max(requests, 1)


def script_instructions(source: str, work: Path, name: str) -> tuple[float, float]:
    """Instructions per EVALSHA of `source` inside redis-server, and Redis commands per call."""
    port = free_port()
    out = work / f"callgrind.redis.{name}"
    argv = [
        *("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--toggle-collect=evalShaCommand"),
        *(redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
        *("--appendonly", "no"),
    ]
    proc = Proc(f"redis-{name}", argv, core=None, log=work / f"redis-{name}.log")
    try:
        proc.wait_listening(port, 60)
        client = redis.Redis(port=port)
        commands = _call_script(client, source)
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # SHUTDOWN closes the connection it came on
    finally:
        proc.stop()
    return callgrind_total(out) / SCRIPT_CALLS, commands


def _call_script(client: redis.Redis, source: str) -> float:
    policy = load_policy_text(policy_variant("metered"))
    customer = policy.customers["customer-0"]
    spec = policy.charges[(customer.plan, "hello")]
    sha = client.script_load(source)
    client.config_resetstat()
    for batch in range(SCRIPT_CALLS // PIPELINE):
        pipe = client.pipeline(transaction=False)
        for i in range(PIPELINE):
            keys, args = script_arguments(meter_request(policy, customer, "hello", spec, time.time()))
            seq = batch * PIPELINE + i + 1
            pipe.evalsha(sha, len(keys), *keys, *args, "callgrind", seq, seq - 1)
        pipe.execute()
    stats = client.info("commandstats")
    inner = sum(int(v["calls"]) for k, v in stats.items() if k not in _NOT_INNER)
    return inner / SCRIPT_CALLS


_NOT_INNER = frozenset(
    {"cmdstat_evalsha", "cmdstat_script", "cmdstat_config", "cmdstat_info", "cmdstat_hello"}
)


def load_policy_text(text: str) -> Policy:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        file.write(text)
    try:
        return load_policy(file.name)
    finally:
        Path(file.name).unlink()


def redis_table(work: Path) -> list[str]:
    shared = "\n".join(
        (Path(__file__).parents[1] / "sidecar/store/redis/lua" / part).read_text() for part in SHARED_SOURCES
    )
    scripts = (
        ("`return 1` (EVALSHA itself, the same KEYS and ARGV)", "return 1"),
        ("the shared library alone (lib.lua + notify_lib.lua, then `return 1`)", shared + "\nreturn 1"),
        ("check_and_meter.lua, as the sidecar calls it", load_script("check_and_meter")),
    )
    rows = ["| script | k instructions per call | Redis commands per call |", "|---|---:|---:|"]
    for index, (label, source) in enumerate(scripts):
        instructions, commands = script_instructions(source, work, str(index))
        rows.append(f"| {label} | {instructions / 1000:.1f} | {commands:.1f} |")
    return rows


def proxy_table(work: Path, seconds: float) -> list[str]:
    server = Proc(
        "redis",
        [redis_server_binary(), "--port", str(port := free_port()), "--bind", "127.0.0.1", "--save", ""],
        core=None,
        log=work / "redis.log",
    )
    server.wait_listening(port, 30)
    upstream_port = free_port()
    upstream = Proc(
        "upstream",
        [sys.executable, "-m", "bench.upstream", "--listen", f"127.0.0.1:{upstream_port}"],
        core=None,
        log=work / "upstream.log",
    )
    upstream.wait_listening(upstream_port, 30)
    rows = ["| proxy (GET /hello, 10 connections) | k instructions per request |", "|---|---:|"]
    for label, variant in PROXIES:
        per_request = proxy_instructions(
            variant, work, f"redis://127.0.0.1:{port}/0", f"http://127.0.0.1:{upstream_port}", seconds
        )
        rows.append(f"| {label} | {per_request / 1000:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.callgrind", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("proxy", "redis"), default=None)
    parser.add_argument("--seconds", type=float, default=6.0, help="the counted wrk run (1-15 s)")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 15:
        parser.error("--seconds must be between 1 and 15")
    missing = [tool for tool in ("valgrind", "callgrind_control", "wrk") if shutil.which(tool) is None]
    if missing:
        print(f"needs {', '.join(missing)} (apt-get install -y valgrind wrk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sidecar-callgrind-") as directory:
        work = Path(directory)
        try:
            if args.only != "redis":
                print("\n".join(proxy_table(work, args.seconds)) + "\n")
            if args.only != "proxy":
                print("\n".join(redis_table(work)))
        finally:
            stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
