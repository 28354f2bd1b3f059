"""The script batcher against a real redis-server: one round trip per loop turn, each script still
run once and atomically, errors per call, one deadline per batch, NOSCRIPT resent once, and the
name a named call carries (and raises when its reply never comes)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from sidecar.errors import OutcomeUnknown, StoreUnavailable
from sidecar.metrics import Metrics
from sidecar.runtime import loops
from sidecar.store.port import MeterRequest, Outcome
from sidecar.store.redis.pipeline import CLIENT_NAME, ScriptBatcher
from sidecar.store.redis.store import RedisStore
from tests.relays import reply_dropper
from tests.store.test_check_and_meter import month_charge, rate_charge

INCR = "return redis.call('INCR', KEYS[1])"
ECHO = "return ARGV"
FAILS_ON_BAD = """
if ARGV[1] == 'bad' then return redis.error_reply('ERR refused on purpose') end
if ARGV[1] == 'crash' then return redis.call('INCR', 'not-a-number-key', 'extra') end
return ARGV[1]
"""
# Keeps Redis busy (and every other client waiting) for ARGV[1] microseconds.
SPIN = """
local t0 = redis.call('TIME')
while true do
  local t = redis.call('TIME')
  if (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) >= tonumber(ARGV[1]) then return 1 end
end
"""


@pytest.fixture
async def plain(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def batcher(redis_url: str) -> AsyncIterator[ScriptBatcher]:
    batcher = ScriptBatcher.of_url(redis_url, timeout=2.0)
    yield batcher
    await batcher.close()


async def script_calls(client: aioredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def test_concurrent_calls_of_one_loop_turn_share_one_round_trip(
    batcher: ScriptBatcher, plain: aioredis.Redis
) -> None:
    incr = batcher.register(INCR)
    await batcher.connect()
    before = await script_calls(plain)
    replies = await asyncio.gather(*(incr(["counter"]) for _ in range(200)))
    after = await script_calls(plain)
    assert sorted(replies) == list(range(1, 201)), "each script ran exactly once, in order"
    assert batcher.calls == 200
    # The first call finds the connection idle and is written at once; the other 199 share one.
    assert batcher.round_trips == 2
    assert after["evalsha"] - before.get("evalsha", 0) == 200, "still one EVALSHA per call"


async def test_a_call_on_an_idle_connection_is_written_at_once(batcher: ScriptBatcher) -> None:
    """At a light load a call does not wait for the rest of its loop turn: it is on the wire
    before the caller yields, and a second call of the same turn waits for the turn's batch."""
    incr = batcher.register(INCR)
    await batcher.connect()
    first = incr(["counter"])
    assert batcher.round_trips == 1, "written before the loop turn ends"
    second = incr(["counter"])
    assert batcher.round_trips == 1, "a call behind one in flight waits for the turn's batch"
    assert [await first, await second] == [1, 2]
    assert batcher.round_trips == 2
    assert await incr(["counter"]) == 3
    assert batcher.round_trips == 3, "idle again once every reply is in"


async def test_calls_of_later_loop_turns_form_later_batches(batcher: ScriptBatcher) -> None:
    incr = batcher.register(INCR)

    async def caller() -> list[int]:
        return [await incr(["counter"]) for _ in range(10)]

    results = await asyncio.gather(*(caller() for _ in range(20)))
    assert sorted(v for r in results for v in r) == list(range(1, 201))
    assert 10 <= batcher.round_trips < 100, "about one batch per round of the 20 callers, not 200"


async def test_an_error_reply_fails_only_its_own_call(batcher: ScriptBatcher) -> None:
    script = batcher.register(FAILS_ON_BAD)
    replies = await asyncio.gather(
        script(args=["ok-1"]),
        script(args=["bad"]),
        script(args=["ok-2"]),
        script(args=["crash"]),
        script(args=["ok-3"]),
        return_exceptions=True,
    )
    assert replies[0] == b"ok-1" and replies[2] == b"ok-2" and replies[4] == b"ok-3"
    assert isinstance(replies[1], StoreUnavailable) and "refused on purpose" in str(replies[1])
    assert isinstance(replies[3], StoreUnavailable)
    assert batcher.round_trips == 1
    assert await script(args=["after"]) == b"after", "the connection stays usable"


async def test_arguments_travel_as_redis_py_would_encode_them(batcher: ScriptBatcher) -> None:
    echo = batcher.register(ECHO)
    reply = await echo([], ["text", 7, -3, 0.5, b"\x00bytes", "ünï"])
    assert reply == [b"text", b"7", b"-3", b"0.5", b"\x00bytes", "ünï".encode()]


async def test_noscript_loads_the_script_and_resends_only_those_calls(
    batcher: ScriptBatcher, plain: aioredis.Redis
) -> None:
    incr = batcher.register(INCR)
    await batcher.connect()  # loads the script
    await plain.script_flush()
    before = await script_calls(plain)
    replies = await asyncio.gather(*(incr(["counter"]) for _ in range(20)))
    after = await script_calls(plain)
    assert sorted(replies) == list(range(1, 21)), "every call ran exactly once"
    loads = after.get("script", 0) - before.get("script", 0)  # redis 6 counts SCRIPT subcommands together
    assert loads == 1, "one SCRIPT LOAD for the batch"
    assert after["evalsha"] - before.get("evalsha", 0) == 40, "20 refused with NOSCRIPT, 20 resent"
    assert int(await plain.get("counter") or 0) == 20


async def test_a_script_registered_after_connecting_is_loaded_on_first_use(batcher: ScriptBatcher) -> None:
    await batcher.connect()
    late = batcher.register("return 'late'")
    assert await late() == b"late"


async def test_one_deadline_bounds_the_whole_batch(redis_url: str, plain: aioredis.Redis) -> None:
    batcher = ScriptBatcher.of_url(redis_url, timeout=0.05)
    incr = batcher.register(INCR)
    try:
        await batcher.connect()
        spin = asyncio.ensure_future(plain.eval(SPIN, 0, 600_000))  # Redis busy for 0.6 s
        await asyncio.sleep(0.02)
        started = time.perf_counter()
        replies = await asyncio.gather(*(incr(["counter"]) for _ in range(30)), return_exceptions=True)
        waited = time.perf_counter() - started
        assert all(isinstance(r, StoreUnavailable) for r in replies)
        assert waited < 0.35, f"the batch waited {waited:.3f}s for a 0.05s deadline, not for Redis"
        await spin
        assert await incr(["counter"]) >= 1, "the next batch opens a new connection and works"
    finally:
        await batcher.close()


async def test_calls_on_a_killed_connection_fail_and_the_next_call_reconnects(
    batcher: ScriptBatcher, plain: aioredis.Redis
) -> None:
    echo = batcher.register(ECHO)
    await batcher.connect()
    clients = await plain.client_list()
    (mine,) = [c for c in clients if c["name"] == CLIENT_NAME]
    await plain.client_kill_filter(_id=mine["id"])
    await asyncio.sleep(0.05)
    assert await echo([], ["again"]) == [b"again"]


async def test_an_unreachable_store_fails_the_batch_at_once() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    batcher = ScriptBatcher.of_url(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    try:
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable, match="cannot open a store connection"):
            await batcher.register(INCR)(["counter"])
        assert time.perf_counter() - started < 0.25
    finally:
        await batcher.close()


async def test_a_closed_batcher_refuses_calls(batcher: ScriptBatcher) -> None:
    echo = batcher.register(ECHO)
    await batcher.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await echo()


async def test_store_admissions_are_coalesced_and_exact(store: RedisStore, plain: aioredis.Redis) -> None:
    now = store.time()
    request = MeterRequest("acme", (month_charge(37, now=now), rate_charge(1000)), (), 60)
    await store.connect()
    before = await script_calls(plain)
    admissions = await asyncio.gather(*(store.check_and_meter(request) for _ in range(100)))
    after = await script_calls(plain)
    assert sum(a.outcome is Outcome.ADMITTED for a in admissions) == 37
    assert after["evalsha"] - before.get("evalsha", 0) == 100
    assert store.batcher.round_trips == 2  # the first call on the idle connection, then the other 99


async def test_round_trips_and_calls_are_exported_as_metrics(store: RedisStore) -> None:
    metrics = Metrics()
    metrics.store_traffic.source = store.traffic
    request = MeterRequest("acme", (rate_charge(1000),), (), 60)
    await asyncio.gather(*(store.check_and_meter(request) for _ in range(10)))
    text = metrics.exposition().decode()
    assert "sidecar_store_script_calls_total 10.0" in text
    assert "sidecar_store_round_trips_total 1.0" in text


def test_the_batcher_works_on_uvloop(redis_url: str) -> None:
    pytest.importorskip("uvloop")

    async def calls() -> list[Any]:
        batcher = ScriptBatcher.of_url(redis_url, timeout=2.0)
        try:
            echo = batcher.register(ECHO)
            return list(await asyncio.gather(*(echo([], [str(i)]) for i in range(5))))
        finally:
            await batcher.close()

    assert loops.run(calls(), "uvloop") == [[str(i).encode()] for i in range(5)]


async def test_a_named_call_carries_its_connection_token_number_and_the_last_reply_read(
    batcher: ScriptBatcher,
) -> None:
    echo = batcher.register(ECHO, named=True)
    first = await echo([], ["a"])
    second = await echo([], ["b"])
    together = await asyncio.gather(echo([], ["c"]), echo([], ["d"]))
    assert first[0] == b"a" and len(first[1]) == 16
    assert [reply[1] for reply in (second, *together)] == [first[1]] * 3, "one connection, one token"
    numbers = [(int(reply[2]), int(reply[3])) for reply in (first, second, *together)]
    assert numbers == [(1, 0), (2, 1), (3, 2), (4, 2)], "a pipeline's calls were written before either reply"


async def test_a_new_connection_names_its_calls_anew(batcher: ScriptBatcher, plain: aioredis.Redis) -> None:
    echo = batcher.register(ECHO, named=True)
    first = await echo([], ["a"])
    (mine,) = [c for c in await plain.client_list() if c["name"] == CLIENT_NAME]
    await plain.client_kill_filter(_id=mine["id"])
    await asyncio.sleep(0.05)
    again = await echo([], ["b"])
    assert again[1] != first[1] and (int(again[2]), int(again[3])) == (1, 0)


def test_registering_one_script_both_named_and_not_is_refused(batcher: ScriptBatcher) -> None:
    batcher.register(ECHO, named=True)
    with pytest.raises(ValueError, match="named or not"):
        batcher.register(ECHO)


async def test_a_call_of_an_unnamed_script_carries_only_its_own_arguments(batcher: ScriptBatcher) -> None:
    assert await batcher.register(ECHO)([], ["a"]) == [b"a"]


async def test_a_named_call_resent_after_noscript_is_named_anew(
    batcher: ScriptBatcher, plain: aioredis.Redis
) -> None:
    echo = batcher.register(ECHO, named=True)
    first = await echo([], ["a"])
    await plain.script_flush()
    again = await echo([], ["b"])
    assert int(again[2]) == int(first[2]) + 2, "number 2 went out and was answered NOSCRIPT; the resend is 3"


async def test_a_named_call_whose_reply_is_lost_raises_outcome_unknown_with_its_name(redis_url: str) -> None:
    async with reply_dropper(redis_url) as dropper:
        batcher = ScriptBatcher.of_url(dropper.url, timeout=2.0)
        try:
            incr = batcher.register(INCR, named=True)
            await incr(["counter"])
            dropper.armed = True
            with pytest.raises(OutcomeUnknown) as lost:
                await incr(["counter"])
            assert lost.value.call.seq == 2 and len(lost.value.call.token) == 16
            assert await incr(["counter"]) == 3, "the lost call ran; a new connection serves the next"
        finally:
            await batcher.close()


async def test_a_named_call_answered_too_late_raises_outcome_unknown(
    redis_url: str, plain: aioredis.Redis
) -> None:
    batcher = ScriptBatcher.of_url(redis_url, timeout=0.05)
    incr = batcher.register(INCR, named=True)
    try:
        await batcher.connect()
        spin = asyncio.ensure_future(plain.eval(SPIN, 0, 300_000))
        await asyncio.sleep(0.02)
        with pytest.raises(OutcomeUnknown):
            await incr(["counter"])
        await spin
    finally:
        await batcher.close()


async def test_a_named_call_that_was_never_written_raises_plain_store_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    batcher = ScriptBatcher.of_url(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable) as refused:
            await batcher.register(INCR, named=True)(["counter"])
        assert not isinstance(refused.value, OutcomeUnknown), "the script cannot have run"
    finally:
        await batcher.close()
