"""The Store contract, one table of cases run against every store: the in-memory store and the
RedisStore on one server, a Cluster and behind Sentinel (one parametrized fixture, the way limits
runs one test body over ALL_STORAGES).

A case is a row: calls made one after another (check, charge, grant), the outcome of each as one
letter, then what a read finds. Calendar windows are built for the store's time when the case
starts. Time that must pass is tested on the memory store's own clock (at the end).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from sidecar.config.policy.model import Limit
from sidecar.config.policy.windows import Period, calendar_window
from sidecar.errors import StoreUnavailable
from sidecar.store.memory import MemoryStore
from sidecar.store.port import (
    Admission,
    CreditCharge,
    Grant,
    GrantOutcome,
    Hold,
    LimitCharge,
    MeterRequest,
    Outcome,
    Store,
    UsageCharge,
)
from sidecar.store.redis import keys
from sidecar.store.redis.store import RedisStore
from tests.helpers import (
    TEST_STORE_TIMEOUT,
    ManualClock,
    day_charge,
    month_charge,
    rate_charge,
    without_windows,
)
from tests.topologies import ALL_TOPOLOGIES, clean_url

CUSTOMER = "acme"
YEAR = 400 * 86400
MOVING = (Period.SECOND, Period.MINUTE, Period.HOUR)  # moving windows; longer periods are calendar quotas
Charge = Callable[[float], LimitCharge]  # a limit's charge for the store's time


@dataclass
class Backend:
    store: Store
    usage: Callable[[], Awaitable[dict[str, int]]]  # the customer's billing usage fields


@pytest.fixture(params=["memory", *ALL_TOPOLOGIES])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        memory = MemoryStore()
        yield Backend(memory, lambda: _memory_usage(memory))
        return
    redis_store = RedisStore.open(clean_url(request, request.param), TEST_STORE_TIMEOUT)
    yield Backend(redis_store, lambda: _redis_usage(redis_store))
    await redis_store.close()


async def _memory_usage(store: MemoryStore) -> dict[str, int]:
    return store.usage(CUSTOMER)


async def _redis_usage(store: RedisStore) -> dict[str, int]:
    fields = await store.client.hgetall(keys.usage(CUSTOMER))  # type: ignore[misc]
    return {k.decode(): int(v) for k, v in fields.items()}


# --- the calls of a case --------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    verb: str  # "check" | "charge" | "grant"
    limits: tuple[Charge, ...] = ()
    credits: tuple[CreditCharge, ...] = ()
    usage: tuple[UsageCharge, ...] = ()
    hold: Hold | None = None
    grant: Grant | None = None

    def request(self, now: float) -> MeterRequest:
        limits = tuple(charge(now) for charge in self.limits)
        holds = bool(self.credits) or self.hold is not None
        return MeterRequest(CUSTOMER, limits, self.usage, 60, self.credits, self.hold, holds)


def check(*limits: Charge, times: int = 1, **parts: object) -> tuple[Call, ...]:
    return (Call("check", limits, **parts),) * times  # type: ignore[arg-type]


def charge(*limits: Charge, times: int = 1, **parts: object) -> tuple[Call, ...]:
    return (Call("charge", limits, **parts),) * times  # type: ignore[arg-type]


def grant(grant_id: str, amount: int) -> tuple[Call, ...]:
    return (Call("grant", grant=Grant(id=grant_id, meter="tokens", amount=amount)),)


LETTERS = {Outcome.ADMITTED: "A", Outcome.REFUSED: "R", Outcome.STALE: "S"}
GRANTED = {GrantOutcome.ADDED: "+", GrantOutcome.REPEATED: "=", GrantOutcome.CONFLICT: "!"}


async def run(store: Store, call: Call, now: float) -> str:
    if call.grant is not None:
        return GRANTED[await store.grant(CUSTOMER, call.grant)]
    operation = store.check_and_meter if call.verb == "check" else store.charge
    return LETTERS[(await operation(call.request(now))).outcome]


# --- the charges the cases use --------------------------------------------------------------------


def month(limit: int, amount: int = 1, meter: str = "requests", *, ago: float = 0) -> Charge:
    return lambda now: month_charge(limit, amount, now=now - ago, meter=meter)


def rate(limit: int, period: Period = Period.SECOND, amount: int = 1, burst: int = 0) -> Charge:
    return lambda now: rate_charge(limit, period, amount, burst)


def soft_day(limit: int) -> Charge:
    return lambda now: day_charge(limit, now=now, soft=True)


def tokens(limit: int, amount: int, period: Period = Period.MONTH, *, reserved: bool = False) -> Charge:
    """A limit on the tokens meter (not counting requests), optionally reserved."""

    def build(now: float) -> LimitCharge:
        window = None if period in MOVING else calendar_window(period, now)
        limit_ = Limit(meter="tokens", limit=limit, period=period)
        return LimitCharge(limit_, amount, window, True, False, reserved=reserved)

    return build


def allowance(limit: int, amount: int) -> Charge:
    """A month allowance of the prepaid tokens meter: drawn before credit, never refusing alone."""

    def build(now: float) -> LimitCharge:
        limit_ = Limit(meter="tokens", limit=limit, period=Period.MONTH)
        return LimitCharge(limit_, amount, calendar_window(Period.MONTH, now), False, False, True)

    return build


def credit(amount: int, *, reserved: bool = False, allowances: tuple[int, ...] = ()) -> CreditCharge:
    return CreditCharge("tokens", amount, True, allowances, reserved)


def used(meter: str, feature: str, amount: int, op: str = "+", distinct: str = "") -> UsageCharge:
    return UsageCharge(meter, feature, amount, op, distinct)


# --- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    calls: tuple[Call, ...]
    outcomes: str  # per call: A admitted, R refused, S stale; grants: + added, = repeated, ! conflict
    read: tuple[Charge, ...] = ()  # the limits read after the calls...
    used: tuple[int, ...] = ()  # ...and what each has used
    balance: int | None = None  # the tokens credit's balance after the calls, and units granted
    granted: int | None = None
    usage: dict[str, int] = field(default_factory=dict)  # billing usage fields, windows left out


CASES = [
    Case("calendar quota admits exactly its limit", check(month(3), times=5), "AAARR", (month(3),), (3,)),
    Case("weighted cost is all or nothing", check(month(25, 10), times=3), "AAR", (month(25),), (20,)),
    Case(
        "one refusing limit charges no other limit",
        check(month(100), rate(1, Period.HOUR), times=2),
        "AR",
        (month(100), rate(1, Period.HOUR)),
        (1, 1),
    ),
    Case("moving window admits its limit", check(rate(3), times=4), "AAAR", (rate(3),), (3,)),
    Case(
        "burst adds to the ceiling of a rate window",
        check(rate(2, Period.MINUTE, burst=3), times=6),
        "AAAAAR",
        (rate(2, Period.MINUTE),),
        (5,),
    ),
    Case(
        "cost above the ceiling is never admitted",
        check(rate(5, Period.MINUTE, 6), times=2),
        "RR",
        (rate(5, Period.MINUTE),),
        (0,),
    ),
    Case("soft limit is charged past its ceiling", check(soft_day(1), times=3), "AAA", (soft_day(1),), (3,)),
    Case(
        "response-time meter is admitted while units remain and not charged",
        check(tokens(1, 0), times=2),
        "AA",
        (tokens(1, 0),),
        (0,),
    ),
    Case(
        "response charge adds past the ceiling, then the meter refuses",
        charge(tokens(1000, 600), times=2) + check(tokens(1000, 0)),
        "AAR",
        (tokens(1000, 0),),
        (1200,),
    ),
    Case(
        "response charge to a moving window counts in that window",
        charge(tokens(10, 7, Period.MINUTE)),
        "A",
        (tokens(10, 0, Period.MINUTE),),
        (7,),
    ),
    Case(
        "a window that does not hold the store's time is stale and writes nothing",
        check(month(10, ago=YEAR)) + charge(month(10, 3, ago=YEAR), usage=(used("requests", "s", 1),)),
        "SS",
        (month(10),),
        (0,),
    ),
    Case(
        "credit admits while it covers the cost and a refusal draws nothing",
        grant("g", 25) + check(credits=(credit(10),), times=3),
        "+AAR",
        balance=5,
        granted=25,
    ),
    Case("no grant refuses even a response-time meter", check(credits=(credit(0),)), "R", balance=0),
    Case(
        "a retried grant counts once and a reused id is a conflict",
        grant("order-1", 500) * 2 + grant("order-1", 900),
        "+=!",
        balance=500,
        granted=500,
    ),
    Case(
        "the period allowance is used before credit",
        grant("pack", 100) + check(allowance(100, 60), credits=(credit(60, allowances=(0,)),), times=2),
        "+AA",
        (allowance(100, 0),),
        (100,),
        balance=80,
    ),
    Case(
        "what the allowance and credit cannot cover is refused",
        grant("pack", 100) + check(allowance(10, 111), credits=(credit(111, allowances=(0,)),)),
        "+R",
        (allowance(10, 0),),
        (0,),
        balance=100,
    ),
    Case(
        "what the response overdraws is paid by the next grant",
        grant("g1", 10) + charge(credits=(credit(30),)) + grant("g2", 50),
        "+A+",
        balance=30,
        granted=60,
    ),
    Case(
        "a reservation is settled to the real amount",
        grant("g", 150)
        + check(credits=(credit(100, reserved=True),), hold=Hold("r1", 60))
        + charge(credits=(credit(30),), hold=Hold("r1", 0)),
        "+AA",
        balance=120,
    ),
    Case(
        "a released reservation costs nothing, and a second release finds nothing",
        grant("g", 150)
        + check(credits=(credit(100, reserved=True),), hold=Hold("r1", 60))
        + charge(hold=Hold("r1", 0), times=2),
        "+AAA",
        balance=150,
    ),
    Case(
        "a reservation held on limits is settled on those limits",
        check(
            tokens(1000, 400, reserved=True),
            tokens(1000, 400, Period.MINUTE, reserved=True),
            hold=Hold("r1", 60),
        )
        + charge(tokens(1000, 70), tokens(1000, 70, Period.MINUTE), hold=Hold("r1", 0)),
        "AA",
        (tokens(1000, 0), tokens(1000, 0, Period.MINUTE)),
        (70, 70),
    ),
    Case(
        "admitted usage lands in the billing window; refused usage nowhere",
        check(month(2), usage=(used("requests", "export", 10),), times=3),
        "AAR",
        usage={"requests|export": 20},
    ),
    Case(
        "response usage keeps sums, maxima, minima and unique values",
        charge(usage=(used("bytes", "up", 5), used("big", "up", 5, "max"), used("small", "up", 5, "min")))
        + charge(usage=(used("bytes", "up", 9), used("big", "up", 9, "max"), used("small", "up", 9, "min")))
        + charge(usage=(used("users", "up", 1, "uniq", "ann"),), times=2)
        + charge(usage=(used("users", "up", 1, "uniq", "bob"),)),
        "AAAAA",
        usage={"bytes|up": 14, "big|up": 9, "small|up": 5, "u|users|up|ann": 2, "u|users|up|bob": 1},
    ),
]


async def read(store: Store, case: Case, now: float) -> Admission:
    credits = (credit(0),) if case.balance is not None else ()
    request = MeterRequest(CUSTOMER, tuple(c(now) for c in case.read), (), 60, credits)
    return await store.read_limits(request)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_case(backend: Backend, case: Case) -> None:
    now = backend.store.time()
    outcomes = [await run(backend.store, call, now) for call in case.calls]
    assert "".join(outcomes) == case.outcomes
    after = await read(backend.store, case, now)
    assert tuple(state.used for state in after.limits) == case.used
    if case.balance is not None:
        assert after.credits[0].balance == case.balance
    if case.granted is not None:
        assert after.credits[0].granted == case.granted
    assert without_windows(await backend.usage()) == case.usage


# --- what a table row cannot say -------------------------------------------------------------------


async def test_a_refusal_changes_no_limit_credit_or_usage(backend: Backend) -> None:
    store, now = backend.store, backend.store.time()
    await store.grant(CUSTOMER, Grant(id="g", meter="tokens", amount=10))
    call = Call("check", (rate(2), month(2)), (credit(2),), (used("requests", "s", 1),))
    assert [await run(store, call, now) for _ in range(3)] == ["A", "A", "R"]
    before = await store.read_limits(call.request(now)), await backend.usage()
    refused = await store.check_and_meter(call.request(now))
    assert [s.over for s in refused.limits] == [True, True] and not refused.credits[0].over
    after = await store.read_limits(call.request(now)), await backend.usage()
    assert [s.used for s in after[0].limits] == [s.used for s in before[0].limits] == [2, 2]
    assert after[0].credits == before[0].credits and after[1] == before[1]


async def test_reset_and_remaining_say_when_units_come_back(backend: Backend) -> None:
    store, now = backend.store, backend.store.time()
    minute, month_ = rate(10, Period.MINUTE, 6), month(5)
    assert await run(store, Call("check", (minute, month_)), now) == "A"
    refused = await store.check_and_meter(Call("check", (minute, month_)).request(now))
    rate_state, month_state = refused.limits
    assert (rate_state.over, rate_state.remaining) == (True, 4)
    assert 59 < rate_state.reset_seconds <= 60  # when the 6 leave the window
    _, end = calendar_window(Period.MONTH, now)
    assert (month_state.over, month_state.remaining) == (False, 4)
    assert abs(month_state.reset_seconds - (end - refused.store_time)) < 1


async def test_concurrent_calls_admit_exactly_the_quota(backend: Backend) -> None:
    now = backend.store.time()
    request = Call("check", (month(37),)).request(now)
    results = await asyncio.gather(*(backend.store.check_and_meter(request) for _ in range(200)))
    assert sum(r.outcome is Outcome.ADMITTED for r in results) == 37


async def test_concurrent_reservations_never_overdraw(backend: Backend) -> None:
    store, now = backend.store, backend.store.time()
    await store.grant(CUSTOMER, Grant(id="g", meter="tokens", amount=1000))

    async def one(n: int) -> Outcome:
        held = Call("check", credits=(credit(30, reserved=True),), hold=Hold(f"r{n}", 60)).request(now)
        admission = await store.check_and_meter(held)
        assert admission.credits[0].balance >= 0
        if admission.outcome is Outcome.ADMITTED:
            await store.charge(Call("charge", credits=(credit(30),), hold=Hold(f"r{n}", 0)).request(now))
        return admission.outcome

    outcomes = await asyncio.gather(*(one(n) for n in range(200)))
    assert outcomes.count(Outcome.ADMITTED) == 33
    after = await store.read_limits(Call("check", credits=(credit(0),)).request(now))
    assert after.credits[0].balance == 10


# --- the memory store against Redis, call for call ------------------------------------------------

POOL: tuple[Charge, ...] = (
    month(6),
    month(9, 3),
    rate(5, Period.MINUTE),
    rate(8, Period.HOUR, 3),
    soft_day(4),
    tokens(12, 0),
    tokens(12, 5),
    tokens(20, 4, Period.MINUTE),
)


def random_call(rng: random.Random) -> Call:
    """A check, charge or grant of random limits, credit, reservation and usage."""
    verb = rng.choice(["check"] * 5 + ["charge"] * 2 + ["grant"])
    if verb == "grant":
        grant_id, amount = f"g{rng.randrange(5)}", rng.choice([5, 20])
        return Call("grant", grant=Grant(id=grant_id, meter="tokens", amount=amount))
    limits = tuple(c for c in POOL if rng.random() < 0.3)
    credits: tuple[CreditCharge, ...] = ()
    if rng.random() < 0.5:
        limits += (allowance(10, 0),)
        reserved = verb == "check" and rng.random() < 0.3
        credits = (credit(rng.choice([0, 3, 8]), reserved=reserved, allowances=(len(limits) - 1,)),)
    hold = Hold(f"h{rng.randrange(3)}", 60 if verb == "check" else 0) if rng.random() < 0.4 else None
    usage = (used("requests", "s", rng.randrange(3)), used("biggest", "s", rng.randrange(9), "max"))
    return Call(verb, limits, credits, usage[: rng.randrange(3)], hold)


def observed(admission: Admission | str) -> object:
    """What both stores must agree on exactly (resets differ by how far apart their clocks read)."""
    if isinstance(admission, str):
        return admission
    limits = [(s.used, s.over) for s in admission.limits]
    return admission.outcome, limits, [(c.granted, c.balance, c.over) for c in admission.credits]


def resets(admission: Admission | str) -> list[float]:
    return [] if isinstance(admission, str) else [s.reset_seconds for s in admission.limits]


async def answer(store: Store, call: Call, now: float) -> Admission | str:
    if call.grant is not None:
        return await run(store, call, now)
    operation = store.check_and_meter if call.verb == "check" else store.charge
    return await operation(call.request(now))


@pytest.mark.parametrize("seed", range(3))
async def test_the_memory_store_answers_every_call_as_redis_does(store: RedisStore, seed: int) -> None:
    memory, rng, now = MemoryStore(), random.Random(seed), store.time()
    for number in range(150):
        call = random_call(rng)
        mine, redis_answer = await answer(memory, call, now), await answer(store, call, now)
        assert observed(mine) == observed(redis_answer), f"call {number}: {call}"
        assert resets(mine) == pytest.approx(resets(redis_answer), abs=0.5), f"call {number}: {call}"
    read = Call("check", (*POOL, allowance(10, 0)), (credit(0, allowances=(len(POOL),)),)).request(now)
    assert observed(await memory.read_limits(read)) == observed(await store.read_limits(read))
    assert await _memory_usage(memory) == await _redis_usage(store)


# --- the memory store's own clock ------------------------------------------------------------------


async def test_a_moving_window_admits_its_limit_in_any_window_of_its_length() -> None:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    start, request = clock.now, Call("check", (rate(3),)).request(clock.now)
    outcomes = []
    for offset in (0.0, 0.4, 0.8, 0.9, 0.99, 1.01, 1.3, 1.41):  # a unit comes back a second after it went
        clock.now = start + offset
        outcomes.append(LETTERS[(await store.check_and_meter(request)).outcome])
    assert "".join(outcomes) == "AAARRARA"


async def test_a_calendar_window_ends_with_its_month_and_the_next_starts_empty() -> None:
    clock = ManualClock(1_769_903_999.5)  # 2026-01-31T23:59:59.5Z
    store = MemoryStore(clock=clock)
    january = Call("check", (month(1),)).request(clock.now)
    assert [await run(store, Call("check", (month(1),)), clock.now) for _ in range(2)] == ["A", "R"]
    clock.now += 1
    assert (await store.check_and_meter(january)).outcome is Outcome.STALE
    assert await run(store, Call("check", (month(1),)), clock.now) == "A"


async def test_an_expired_grant_stops_counting_and_an_expired_reservation_is_released() -> None:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    expiring = Grant(id="trial", meter="tokens", amount=100, expires_at=int(clock.now) + 10)
    await store.grant(CUSTOMER, expiring)
    await store.grant(CUSTOMER, Grant(id="paid", meter="tokens", amount=40))
    held = Call("check", credits=(credit(120, reserved=True),), hold=Hold("crashed", 5))
    assert await run(store, held, clock.now) == "A"
    clock.now += 5
    balance = Call("check", credits=(credit(0),)).request(clock.now)
    assert (await store.read_limits(balance)).credits[0].balance == 20  # still held until a check
    assert (await store.check_and_meter(balance)).credits[0].balance == 140  # released first
    clock.now += 5
    state = (await store.read_limits(balance)).credits[0]
    assert (state.granted, state.balance) == (40, 40)


async def test_a_memory_store_that_is_down_raises_store_unavailable_and_replay_is_out_of_scope() -> None:
    store = MemoryStore()
    store.down = True
    with pytest.raises(StoreUnavailable, match="down"):
        await store.check_and_meter(Call("check", (month(1),)).request(store.time()))
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(NotImplementedError, match="RedisStore"):
        await store.replay(object())
