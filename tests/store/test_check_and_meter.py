"""check_and_meter.lua against a real redis-server: all-or-nothing, exact, the store's clock."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.crc import key_slot

from sidecar.config.policy.model import Limit, OnExceed
from sidecar.config.policy.windows import Period, calendar_window
from sidecar.store.port import LimitCharge, MeterRequest, Outcome, UsageCharge
from sidecar.store.redis.store import RedisStore


def month_charge(
    limit: int, amount: int = 1, *, now: float, enforced: bool = True, meter: str = "requests"
) -> LimitCharge:
    return LimitCharge(
        Limit(meter=meter, limit=limit, period=Period.MONTH),
        amount,
        calendar_window(Period.MONTH, now),
        enforced,
    )


def rate_charge(limit: int, period: Period = Period.SECOND, amount: int = 1, burst: int = 0) -> LimitCharge:
    return LimitCharge(Limit(meter="requests", limit=limit, period=period, burst=burst), amount, None, True)


def request_for(*charges: LimitCharge, usage: tuple[UsageCharge, ...] = ()) -> MeterRequest:
    return MeterRequest("acme", charges, usage, 60)


async def dumps(client: aioredis.Redis) -> dict[bytes, bytes | None]:
    """Every key's serialized value."""
    return {key: await client.dump(key) for key in await client.keys("*")}


async def ttls(client: aioredis.Redis) -> dict[bytes, int]:
    return {key: await client.pttl(key) for key in await client.keys("*")}


async def test_calendar_quota_admits_exactly_its_limit(store: RedisStore) -> None:
    now = store.time()
    outcomes = [
        (await store.check_and_meter(request_for(month_charge(3, now=now)))).outcome for _ in range(5)
    ]
    assert outcomes == [Outcome.ADMITTED] * 3 + [Outcome.REFUSED] * 2


async def test_refused_request_leaves_the_store_byte_for_byte_unchanged(store: RedisStore) -> None:
    now = store.time()
    charges = (rate_charge(5), month_charge(2, now=now))
    for _ in range(2):
        await store.check_and_meter(request_for(*charges, usage=(UsageCharge("requests", "search", 1, "+"),)))
    values_before, ttls_before = await dumps(store.client), await ttls(store.client)
    refused = await store.check_and_meter(
        request_for(*charges, usage=(UsageCharge("requests", "search", 1, "+"),))
    )
    assert refused.outcome is Outcome.REFUSED
    assert await dumps(store.client) == values_before
    ttls_after = await ttls(store.client)
    assert ttls_after.keys() == ttls_before.keys()
    assert all(ttls_after[key] <= ttls_before[key] for key in ttls_before), "a refusal refreshed an expiry"


async def test_weighted_cost_is_all_or_nothing(store: RedisStore) -> None:
    now = store.time()
    charge = month_charge(25, amount=10, now=now)
    outcomes = [(await store.check_and_meter(request_for(charge))).outcome for _ in range(3)]
    assert outcomes == [Outcome.ADMITTED, Outcome.ADMITTED, Outcome.REFUSED]
    state = (await store.read_limits(request_for(charge))).limits[0]
    assert (state.used, state.remaining) == (20, 5)


async def test_one_refusing_limit_charges_no_other_limit(store: RedisStore) -> None:
    now = store.time()
    roomy, tight = month_charge(100, now=now), rate_charge(1, Period.HOUR)
    await store.check_and_meter(request_for(roomy, tight))
    refused = await store.check_and_meter(request_for(roomy, tight))
    assert refused.outcome is Outcome.REFUSED
    assert [s.over for s in refused.limits] == [False, True]
    assert (await store.read_limits(request_for(roomy))).limits[0].used == 1


async def test_concurrent_calls_admit_exactly_the_quota(store: RedisStore) -> None:
    now = store.time()
    charge = month_charge(37, now=now)
    results = await asyncio.gather(*(store.check_and_meter(request_for(charge)) for _ in range(200)))
    assert sum(r.outcome is Outcome.ADMITTED for r in results) == 37


async def test_moving_window_counts_the_last_period_not_the_calendar_second(store: RedisStore) -> None:
    charge = rate_charge(3, Period.SECOND)
    first = [(await store.check_and_meter(request_for(charge))).outcome for _ in range(4)]
    assert first == [Outcome.ADMITTED] * 3 + [Outcome.REFUSED]
    refused = await store.check_and_meter(request_for(charge))
    assert 0 < refused.limits[0].reset_seconds <= 1.0
    await asyncio.sleep(refused.limits[0].reset_seconds + 0.01)
    assert (await store.check_and_meter(request_for(charge))).outcome is Outcome.ADMITTED


async def test_burst_adds_to_the_ceiling_of_a_rate_window(store: RedisStore) -> None:
    charge = rate_charge(2, Period.MINUTE, burst=3)
    outcomes = [(await store.check_and_meter(request_for(charge))).outcome for _ in range(6)]
    assert outcomes == [Outcome.ADMITTED] * 5 + [Outcome.REFUSED]


async def test_weighted_moving_window_frees_units_oldest_first(store: RedisStore) -> None:
    heavy, light = rate_charge(10, Period.MINUTE, amount=6), rate_charge(10, Period.MINUTE, amount=4)
    assert (await store.check_and_meter(request_for(heavy))).outcome is Outcome.ADMITTED
    assert (await store.check_and_meter(request_for(light))).outcome is Outcome.ADMITTED
    refused = await store.check_and_meter(request_for(rate_charge(10, Period.MINUTE, amount=1)))
    assert refused.outcome is Outcome.REFUSED
    assert 59 < refused.limits[0].reset_seconds <= 60


async def test_cost_above_the_ceiling_is_never_admitted(store: RedisStore) -> None:
    refused = await store.check_and_meter(request_for(rate_charge(5, Period.MINUTE, amount=6)))
    assert refused.outcome is Outcome.REFUSED
    assert refused.limits[0].reset_seconds == 60


async def test_soft_limit_is_charged_past_its_ceiling_and_reports_over(store: RedisStore) -> None:
    now = store.time()
    soft = LimitCharge(
        Limit(meter="requests", limit=1, period=Period.DAY, on_exceed=OnExceed.ALLOW),
        1,
        calendar_window(Period.DAY, now),
        enforced=False,
    )
    results = [await store.check_and_meter(request_for(soft)) for _ in range(3)]
    assert [r.outcome for r in results] == [Outcome.ADMITTED] * 3
    assert [r.limits[0].over for r in results] == [False, True, True]
    assert results[-1].limits[0].used == 3


async def test_response_time_meter_is_admitted_while_units_remain_and_not_charged(store: RedisStore) -> None:
    now = store.time()
    tokens = month_charge(1, amount=0, now=now, meter="tokens")
    first = await store.check_and_meter(request_for(tokens))
    assert first.outcome is Outcome.ADMITTED and first.limits[0].used == 0
    assert await store.client.keys("*") == []


async def test_window_that_does_not_hold_the_store_time_is_stale_and_writes_nothing(
    store: RedisStore,
) -> None:
    last_year = store.time() - 400 * 86400
    stale = await store.check_and_meter(request_for(month_charge(10, now=last_year)))
    assert stale.outcome is Outcome.STALE
    assert abs(stale.store_time - store.time()) < 5
    assert await store.client.keys("*") == []


async def test_admitted_usage_lands_in_the_current_billing_window(store: RedisStore) -> None:
    usage = (UsageCharge("requests", "export", 10, "+"),)
    for _ in range(3):
        admission = await store.check_and_meter(request_for(usage=usage))
    window = int(admission.store_time) // 60 * 60
    assert await store.client.hgetall("sc:{c:acme}:u") == {f"{window}|requests|export".encode(): b"30"}


async def test_every_key_of_a_customer_shares_one_cluster_slot(store: RedisStore) -> None:
    now = store.time()
    await store.check_and_meter(
        request_for(rate_charge(5), month_charge(5, now=now), usage=(UsageCharge("requests", "s", 1, "+"),))
    )
    slots = {key_slot(key) for key in await store.client.keys("*")}
    assert len(slots) == 1


async def test_response_charge_adds_past_the_ceiling_without_refusing(store: RedisStore) -> None:
    now = store.time()
    tokens = month_charge(1000, amount=600, now=now, meter="tokens")
    for _ in range(2):
        assert (await store.charge(request_for(tokens))).outcome is Outcome.ADMITTED
    state = (await store.read_limits(request_for(tokens))).limits[0]
    assert (state.used, state.remaining) == (1200, 0)
    refused = await store.check_and_meter(request_for(month_charge(1000, amount=0, now=now, meter="tokens")))
    assert refused.outcome is Outcome.REFUSED


async def test_response_charge_to_a_moving_window_counts_in_that_window(store: RedisStore) -> None:
    charge = rate_charge(10, Period.MINUTE, amount=7)
    await store.charge(request_for(charge))
    state = (await store.read_limits(request_for(charge))).limits[0]
    assert state.used == 7


async def test_response_charge_records_max_and_sum_usage(store: RedisStore) -> None:
    for amount in (5, 9, 3):
        charged = await store.charge(
            request_for(
                usage=(UsageCharge("bytes", "up", amount, "+"), UsageCharge("largest", "up", amount, "max"))
            )
        )
    window = int(charged.store_time) // 60 * 60
    usage = await store.client.hgetall("sc:{c:acme}:u")
    assert usage == {f"{window}|bytes|up".encode(): b"17", f"{window}|largest|up".encode(): b"9"}


async def test_response_charge_in_a_stale_window_writes_nothing(store: RedisStore) -> None:
    last_year = store.time() - 400 * 86400
    stale = await store.charge(request_for(month_charge(10, amount=3, now=last_year, meter="tokens")))
    assert stale.outcome is Outcome.STALE
    assert await store.client.keys("*") == []
