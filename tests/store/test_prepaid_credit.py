"""Prepaid credit and reservations in the scripts, against a real redis-server.

Grants are drawn earliest expiry first after the period allowance; a reservation holds units at
admission and is settled, released, or expires; concurrent reservations never overdraw.
"""

from __future__ import annotations

import asyncio

from sidecar.config.policy.model import Limit
from sidecar.config.policy.windows import Period, calendar_window
from sidecar.store.port import (
    CreditCharge,
    Grant,
    GrantOutcome,
    Hold,
    LimitCharge,
    MeterRequest,
    Outcome,
)
from sidecar.store.redis.store import RedisStore

CUSTOMER = "acme"


def credit(amount: int, *, reserved: bool = False, allowances: tuple[int, ...] = ()) -> CreditCharge:
    return CreditCharge("tokens", amount, True, allowances, reserved)


def draw(
    *credits: CreditCharge, limits: tuple[LimitCharge, ...] = (), hold: Hold | None = None
) -> MeterRequest:
    return MeterRequest(CUSTOMER, limits, (), 60, credits, hold, holds=True)


def allowance(limit: int, now: float, amount: int) -> LimitCharge:
    window = calendar_window(Period.MONTH, now)
    return LimitCharge(
        Limit(meter="tokens", limit=limit, period=Period.MONTH), amount, window, False, False, True
    )


async def balance(store: RedisStore) -> int:
    return (await store.read_limits(draw(credit(0)))).credits[0].balance


async def test_a_retried_grant_counts_once(store: RedisStore) -> None:
    grant = Grant(id="order-1", meter="tokens", amount=500)
    assert await store.grant(CUSTOMER, grant) is GrantOutcome.ADDED
    assert await store.grant(CUSTOMER, grant) is GrantOutcome.REPEATED
    state = (await store.read_limits(draw(credit(0)))).credits[0]
    assert (state.granted, state.balance, state.used) == (500, 500, 0)


async def test_a_grant_id_reused_for_a_different_grant_is_refused(store: RedisStore) -> None:
    assert await store.grant(CUSTOMER, Grant(id="order-1", meter="tokens", amount=500)) is GrantOutcome.ADDED
    changed = Grant(id="order-1", meter="tokens", amount=900)
    assert await store.grant(CUSTOMER, changed) is GrantOutcome.CONFLICT
    assert await balance(store) == 500


async def test_credit_admits_while_it_covers_the_cost_and_a_refusal_draws_nothing(store: RedisStore) -> None:
    await store.grant(CUSTOMER, Grant(id="g", meter="tokens", amount=25))
    outcomes = [(await store.check_and_meter(draw(credit(10)))).outcome for _ in range(3)]
    assert outcomes == [Outcome.ADMITTED, Outcome.ADMITTED, Outcome.REFUSED]
    refused = await store.check_and_meter(draw(credit(10)))
    assert refused.credits[0].over and refused.credits[0].balance == 5
    assert await balance(store) == 5


async def test_no_grant_refuses_even_a_response_time_meter(store: RedisStore) -> None:
    refused = await store.check_and_meter(draw(credit(0)))
    assert refused.outcome is Outcome.REFUSED
    assert (refused.credits[0].granted, refused.credits[0].balance) == (0, 0)


async def test_grants_are_drawn_earliest_expiry_first(store: RedisStore) -> None:
    now = int(store.time())
    await store.grant(CUSTOMER, Grant(id="forever", meter="tokens", amount=100))
    await store.grant(CUSTOMER, Grant(id="late", meter="tokens", amount=100, expires_at=now + 7200))
    await store.grant(CUSTOMER, Grant(id="soon", meter="tokens", amount=100, expires_at=now + 3600))
    assert (await store.check_and_meter(draw(credit(150)))).outcome is Outcome.ADMITTED
    left = await store.client.hmget("sc:{c:acme}:cr:tokens", ["soon", "late", "forever"])
    assert [int(v) for v in left] == [0, 50, 100]


async def test_an_expired_grant_stops_counting(store: RedisStore) -> None:
    now = int(store.time())
    await store.grant(CUSTOMER, Grant(id="trial", meter="tokens", amount=100, expires_at=now + 1))
    await store.grant(CUSTOMER, Grant(id="paid", meter="tokens", amount=40))
    assert await balance(store) == 140
    await asyncio.sleep(max(0.0, now + 1 - store.time()) + 0.05)
    state = (await store.read_limits(draw(credit(0)))).credits[0]
    assert (state.granted, state.balance) == (40, 40)
    assert (await store.check_and_meter(draw(credit(50)))).outcome is Outcome.REFUSED


async def test_the_period_allowance_is_used_before_credit(store: RedisStore) -> None:
    now = store.time()
    await store.grant(CUSTOMER, Grant(id="pack", meter="tokens", amount=100))
    for _ in range(2):
        request = draw(credit(60, allowances=(0,)), limits=(allowance(100, now, 60),))
        assert (await store.check_and_meter(request)).outcome is Outcome.ADMITTED
    state = await store.read_limits(draw(credit(0, allowances=(0,)), limits=(allowance(100, now, 0),)))
    assert state.limits[0].used == 100  # the allowance is used up first...
    assert state.credits[0].balance == 80  # ...and only the 20 it could not cover came from credit
    refused = await store.check_and_meter(
        draw(credit(81, allowances=(0,)), limits=(allowance(100, now, 81),))
    )
    assert refused.outcome is Outcome.REFUSED


async def test_what_the_response_overdraws_is_paid_by_the_next_grant(store: RedisStore) -> None:
    await store.grant(CUSTOMER, Grant(id="g1", meter="tokens", amount=10))
    await store.charge(draw(credit(30)))
    assert await balance(store) == -20
    await store.grant(CUSTOMER, Grant(id="g2", meter="tokens", amount=50))
    state = (await store.read_limits(draw(credit(0)))).credits[0]
    assert (state.granted, state.used, state.balance) == (60, 30, 30)


async def test_a_reservation_is_settled_to_the_real_amount(store: RedisStore) -> None:
    await store.grant(CUSTOMER, Grant(id="g", meter="tokens", amount=150))
    held = await store.check_and_meter(draw(credit(100, reserved=True), hold=Hold("r1", 60)))
    assert held.outcome is Outcome.ADMITTED and held.credits[0].balance == 50
    await store.charge(draw(credit(30), hold=Hold("r1", 0)))
    assert await balance(store) == 120


async def test_a_released_reservation_costs_nothing(store: RedisStore) -> None:
    await store.grant(CUSTOMER, Grant(id="g", meter="tokens", amount=150))
    await store.check_and_meter(draw(credit(100, reserved=True), hold=Hold("r1", 60)))
    await store.charge(draw(hold=Hold("r1", 0)))
    assert await balance(store) == 150
    await store.charge(draw(hold=Hold("r1", 0)))  # a second release finds nothing to undo
    assert await balance(store) == 150


async def test_a_reservation_held_on_a_limit_is_settled_on_that_limit(store: RedisStore) -> None:
    now = store.time()
    window = calendar_window(Period.MONTH, now)
    limit = Limit(meter="tokens", limit=1000, period=Period.MONTH)
    rate = Limit(meter="tokens", limit=1000, period=Period.MINUTE)
    held = (
        LimitCharge(limit, 400, window, True, False, reserved=True),
        LimitCharge(rate, 400, None, True, False, reserved=True),
    )
    assert (
        await store.check_and_meter(MeterRequest(CUSTOMER, held, (), 60, hold=Hold("r1", 60), holds=True))
    ).outcome is Outcome.ADMITTED
    real = (LimitCharge(limit, 70, window, True, False), LimitCharge(rate, 70, None, True, False))
    await store.charge(MeterRequest(CUSTOMER, real, (), 60, hold=Hold("r1", 0), holds=True))
    read = await store.read_limits(MeterRequest(CUSTOMER, real, (), 60))
    assert [s.used for s in read.limits] == [70, 70]


async def test_a_reservation_nobody_settles_expires(store: RedisStore) -> None:
    await store.grant(CUSTOMER, Grant(id="g", meter="tokens", amount=150))
    await store.check_and_meter(draw(credit(100, reserved=True), hold=Hold("crashed", 1)))
    assert await balance(store) == 50
    await asyncio.sleep(1.1)
    after = await store.check_and_meter(draw(credit(120, reserved=True), hold=Hold("next", 60)))
    assert after.outcome is Outcome.ADMITTED and after.credits[0].balance == 30
    await store.charge(draw(credit(100), hold=Hold("crashed", 0)))  # late settle: only the real amount
    assert await balance(store) == -70


async def test_concurrent_reservations_never_overdraw(store: RedisStore) -> None:
    await store.grant(CUSTOMER, Grant(id="g", meter="tokens", amount=1000))

    async def one(n: int) -> Outcome:
        admission = await store.check_and_meter(draw(credit(30, reserved=True), hold=Hold(f"r{n}", 60)))
        assert admission.credits[0].balance >= 0
        if admission.outcome is Outcome.ADMITTED:
            await store.charge(draw(credit(30), hold=Hold(f"r{n}", 0)))
        return admission.outcome

    outcomes = await asyncio.gather(*(one(n) for n in range(200)))
    assert outcomes.count(Outcome.ADMITTED) == 33
    assert await balance(store) == 10
