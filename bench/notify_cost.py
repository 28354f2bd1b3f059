"""What threshold notifications add to Redis's own CPU per admitted request when no threshold is
crossed (SPEC §9; the target is under 2 µs): the same check_and_meter call with and without its
notification block, alternated over rounds against a redis-server of its own (or ``--redis``).

Each round makes ``--calls`` admissions from 50 concurrent callers through the sidecar's batcher
and reads two counters from Redis before and after: ``INFO commandstats`` (the microseconds
Redis spent inside EVALSHA: the script's own work) and ``INFO cpu`` (the server process's user
plus system CPU: parsing the bigger call and its reply too). The ceilings are far above what a
round uses, so no call crosses a threshold. The variants alternate, each going first every other
round, so load from elsewhere on the machine falls on both alike; the report gives each
variant's cheapest round and the median of the paired differences. On a shared machine both
counters still move with other load, so the decision itself is also timed inside Redis
(``decision_ns``): one script runs lib.lua's read_notify and notify_lib.lua's notify_crossings
on a two-limit request 200,000 times between two TIME calls, against the same loop without them;
and what Redis spends taking the block's extra key and arguments (``arguments_ns``): EVALSHA µs
of a script that does nothing, given the call's KEYS and ARGV with and without the block.

    python -m bench.notify_cost [--calls 20000] [--rounds 5] [--redis redis://127.0.0.1:PORT/0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from sidecar.config.policy.model import Limit
from sidecar.config.policy.windows import Period, calendar_window
from sidecar.store.port import LimitCharge, MeterRequest, Outcome, UsageCharge
from sidecar.store.redis.calls import SHARED_SOURCES
from sidecar.store.redis.embedded import EmbeddedRedis
from sidecar.store.redis.store import RedisStore, script_arguments

CALLERS = 50
HUGE = 10**12  # no round comes near 80% of it


def request(now: float, thresholds: tuple[int, ...]) -> MeterRequest:
    """A plan's usual admission: a month and a day quota, one unit of billing usage."""
    limits = tuple(
        LimitCharge(Limit(meter="requests", limit=HUGE, period=period), 1, calendar_window(period, now), True)
        for period in (Period.MONTH, Period.DAY)
    )
    usage = (UsageCharge("requests", "search", 1, "+"),)
    return MeterRequest("bench", limits, usage, 60, plan="pro", thresholds=thresholds)


async def counters(store: RedisStore) -> tuple[float, float, int]:
    """(Redis CPU seconds, µs inside EVALSHA, EVALSHA calls) so far."""
    cpu: dict[str, Any] = await store.client.info("cpu")
    stats: dict[str, Any] = await store.client.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {"usec": 0, "calls": 0})
    return (
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        float(evalsha["usec"]),
        int(evalsha["calls"]),
    )


async def one_round(store: RedisStore, call: MeterRequest, calls: int) -> tuple[float, float]:
    """Redis CPU µs and EVALSHA µs per admitted call over one round."""

    async def caller(n: int) -> None:
        for _ in range(n):
            admitted = await store.check_and_meter(call)
            assert admitted.outcome is Outcome.ADMITTED, admitted

    before = await counters(store)
    await asyncio.gather(*(caller(calls // CALLERS) for _ in range(CALLERS)))
    after = await counters(store)
    made = after[2] - before[2]
    return (after[0] - before[0]) / made * 1e6, (after[1] - before[1]) / made


async def measure(url: str, calls: int, rounds: int) -> dict[str, tuple[float, float]]:
    store = RedisStore.open(url, 5.0)  # a loaded machine must not fail a round
    await store.connect()
    try:
        await store.check_and_meter(request(store.time(), ()))  # learns the store's clock
        plain, watched = request(store.time(), ()), request(store.time(), (50, 80, 100))
        results: dict[str, list[tuple[float, float]]] = {"without": [], "with": []}
        variants = [("without", plain), ("with", watched)]
        for round_number in range(rounds):  # each goes first every other round: no order effect
            for name, call in variants if round_number % 2 == 0 else variants[::-1]:
                results[name].append(await one_round(store, call, calls))
        assert await store.notifications.pending("bench") == [], "a threshold was crossed"
        summary = summarize(results)
        summary["decision alone, timed inside Redis (µs)"] = (await decision_ns(store) / 1000, 0.0)
        summary["the block's key and arguments alone (µs)"] = (
            0.0,
            await arguments_ns(store, store.time()) / 1000,
        )
        return summary
    finally:
        await store.close()


_DECISION_LOOP = """
local n, watch = tonumber(ARGV[1]), ARGV[2] == '1'
local t0 = redis.call('TIME')
for _ = 1, n do
  local req = {interval = 60, hold = '', ttl = 0, limits = {}, credits = {}, deadline_us = 0,
    usage_key = 'u', usage_from = 3, usage_to = #ARGV}
  req.limits[1] = {before = 10, used = 11, ceiling = 1000000000000}
  req.limits[2] = {before = 10, used = 11, ceiling = 1000000000000}
  if watch then
    read_notify(req, 'no')
    notify_crossings(req, 1767225600)
  end
end
local t1 = redis.call('TIME')
return (tonumber(t1[1]) - tonumber(t0[1])) * 1000000 + tonumber(t1[2]) - tonumber(t0[2])
"""


async def decision_ns(store: RedisStore, loops: int = 200_000, rounds: int = 5) -> float:
    """Nanoseconds the notification decision adds to a call that crosses nothing, timed inside
    Redis; the least of ``rounds``."""
    lua = resources.files("sidecar.store.redis").joinpath("lua")
    script = store.client.register_script(
        "\n".join([*(lua.joinpath(p).read_text() for p in SHARED_SOURCES), _DECISION_LOOP])
    )
    block: list[str | int] = ["pro", 50, 80, 100, 3]
    added = []
    for _ in range(rounds):
        without = int(await script(args=[loops, "0", *block]))
        watched = int(await script(args=[loops, "1", *block]))
        added.append((watched - without) / loops * 1000)
    return min(added)


async def arguments_ns(store: RedisStore, now: float, pairs: int = 15, calls: int = 20_000) -> float:
    """Nanoseconds Redis spends on the notification block's key and arguments alone: the median,
    over ``pairs``, of the difference in EVALSHA µs of ``return 1`` given both layouts."""
    nothing = await store.client.script_load("return 1")
    layouts = [script_arguments(request(now, thresholds)) for thresholds in ((), (50, 80, 100))]
    differences = []
    for _ in range(pairs):
        spent = []
        for key_list, args in layouts:
            before = await counters(store)
            for _ in range(calls // 500):
                pipe = store.client.pipeline(transaction=False)
                for _ in range(500):
                    pipe.evalsha(nothing, len(key_list), *key_list, *args, "bench", 1, 1)
                await pipe.execute()
            after = await counters(store)
            spent.append((after[1] - before[1]) / (after[2] - before[2]))
        differences.append((spent[1] - spent[0]) * 1000)
    return statistics.median(differences)


def summarize(results: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """Each variant's cheapest round, and 'added': the median of the (with - without) pairs."""
    cheapest = {name: (min(r[0] for r in runs), min(r[1] for r in runs)) for name, runs in results.items()}
    pairs = list(zip(results["without"], results["with"], strict=True))
    added = tuple(statistics.median(w[i] - o[i] for o, w in pairs) for i in (0, 1))
    return {**cheapest, "added (median of pairs)": (added[0], added[1])}


def report(results: dict[str, tuple[float, float]]) -> str:
    lines = ["| notifications | Redis CPU µs per admitted | EVALSHA µs per admitted |", "|---|---|---|"]
    for name, (cpu, script) in results.items():
        lines.append(f"| {name} | {cpu:.2f} | {script:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis", default="")
    options = parser.parse_args()
    if options.redis:
        print(report(asyncio.run(measure(options.redis, options.calls, options.rounds))))
        return
    with tempfile.TemporaryDirectory() as directory:
        server = EmbeddedRedis(Path(directory), persistent=False)
        try:
            url = server.start()
            print(report(asyncio.run(measure(url, options.calls, options.rounds))))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
