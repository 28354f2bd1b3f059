"""Threshold notifications decided in the metering scripts, and their outbox, on a real redis-server.

A crossing is recorded by the one call whose charge takes usage across it, once: a marker set in
the same atomic step keeps any later call (an undo charged again, a settled reservation, another
replica) from recording it again. Credit notifies credit.low at its thresholds and
credit.exhausted at zero. Delivery bookkeeping: lease, settle, dead letters, redrive, recent.
"""

from __future__ import annotations

import asyncio

from sidecar.config.policy.windows import Period, calendar_window
from sidecar.ledger.entry import decode, encode
from sidecar.store.notifications import CREDIT_EXHAUSTED, CREDIT_LOW, LIMIT_THRESHOLD, Notification
from sidecar.store.port import (
    CreditCharge,
    Dedupe,
    Grant,
    Hold,
    LimitCharge,
    MeterRequest,
    Outcome,
    RecordOutcome,
    Replayed,
    UsageEntry,
    UsageRecord,
)
from sidecar.store.redis import keys
from sidecar.store.redis.store import RedisStore, script_arguments
from tests.helpers import month_charge, rate_charge

CUSTOMER = "acme"
THRESHOLDS = (80, 100)


def watching(
    *limits: LimitCharge, credits: tuple[CreditCharge, ...] = (), hold: Hold | None = None
) -> MeterRequest:
    return MeterRequest(
        CUSTOMER, limits, (), 60, credits, hold, bool(credits) or hold is not None, "pro", THRESHOLDS
    )


async def crossings(store: RedisStore) -> list[tuple[str, int, int]]:
    return [(n.type, n.threshold, n.used) for n in await store.notifications.pending(CUSTOMER)]


async def test_each_threshold_of_a_limit_is_recorded_by_the_call_that_crosses_it(store: RedisStore) -> None:
    now = store.time() or 1_767_225_600.0
    for _ in range(11):
        await store.check_and_meter(watching(month_charge(10, now=store.time() or now, enforced=False)))
    pending = await store.notifications.pending(CUSTOMER)
    assert [(n.type, n.threshold, n.used, n.limit) for n in pending] == [
        (LIMIT_THRESHOLD, 80, 8, 10),
        (LIMIT_THRESHOLD, 100, 10, 10),
    ]
    window = calendar_window(Period.MONTH, store.time())
    first = pending[0]
    assert (first.name, first.plan, first.window_start, first.window_end) == (
        "requests-month",
        "pro",
        *window,
    )
    assert first.crossing == f"limit.threshold|requests-month|{window[0]}|80"
    assert await store.notifications.schedule_noted(1) == 1  # the replies said so


async def test_one_call_crossing_both_thresholds_records_both(store: RedisStore) -> None:
    admitted = await store.check_and_meter(
        watching(month_charge(10, 10, now=store.time() or 1_767_225_600.0))
    )
    assert admitted.outcome is Outcome.ADMITTED
    assert await crossings(store) == [(LIMIT_THRESHOLD, 80, 10), (LIMIT_THRESHOLD, 100, 10)]


async def test_a_refused_call_records_nothing(store: RedisStore) -> None:
    refused = await store.check_and_meter(watching(month_charge(10, 11, now=store.time() or 1_767_225_600.0)))
    assert refused.outcome is Outcome.REFUSED
    assert await crossings(store) == []


async def test_usage_that_falls_back_and_crosses_again_is_not_recorded_twice(store: RedisStore) -> None:
    """A reservation crosses 80% at admission; its settle gives it back and charges less, then
    more traffic crosses 80% again in the same window: the marker keeps it to one."""
    now = store.time() or 1_767_225_600.0
    limit = month_charge(10, 0, now=now)
    reserving = LimitCharge(limit.limit, 9, limit.window, True, reserved=True)
    await store.check_and_meter(watching(reserving, hold=Hold("h1", 60)))
    assert await crossings(store) == [(LIMIT_THRESHOLD, 80, 9)]
    await store.charge(watching(LimitCharge(limit.limit, 2, limit.window, True), hold=Hold("h1", 0)))
    for _ in range(8):  # 3 to 10: across 80% again, then 100%
        await store.check_and_meter(watching(month_charge(10, now=store.time())))
    assert await crossings(store) == [(LIMIT_THRESHOLD, 80, 9), (LIMIT_THRESHOLD, 100, 10)]


async def test_a_rate_limit_notifies_once_per_period_long_span(store: RedisStore) -> None:
    for _ in range(5):
        await store.check_and_meter(watching(rate_charge(5, Period.MINUTE)))
    (eighty, full) = await store.notifications.pending(CUSTOMER)
    assert (eighty.threshold, full.threshold) == (80, 100)
    assert eighty.window_end is not None and eighty.window_start is not None
    assert eighty.window_end - eighty.window_start == 60 and eighty.window_start % 60 == 0


async def test_credit_notifies_low_at_its_thresholds_and_exhausted_at_zero(store: RedisStore) -> None:
    await store.grant(CUSTOMER, Grant(id="g1", meter="tokens", amount=10))
    drawing = watching(credits=(CreditCharge("tokens", 3, True),))
    for _ in range(4):
        await store.check_and_meter(drawing)  # 3, 6, 9, then refused
    await store.charge(watching(credits=(CreditCharge("tokens", 2, False),)))  # a response-time overdraft
    assert await crossings(store) == [(CREDIT_LOW, 80, 9), (CREDIT_EXHAUSTED, 100, 11)]
    low, _ = await store.notifications.pending(CUSTOMER)
    assert (low.name, low.limit, low.window_start) == ("tokens", 10, None)
    await store.grant(CUSTOMER, Grant(id="g2", meter="tokens", amount=10))  # a new set of grants re-arms
    await store.check_and_meter(
        watching(credits=(CreditCharge("tokens", 9, True),))
    )  # the overdraft paid: 9 left
    assert [c[:2] for c in await crossings(store)][2:] == [(CREDIT_LOW, 80), (CREDIT_EXHAUSTED, 100)]


async def test_two_stores_crossing_together_record_each_crossing_once(
    store: RedisStore, redis_url: str
) -> None:
    other = RedisStore.open(redis_url, 2.0)
    try:
        now = store.time() or 1_767_225_600.0
        calls = [
            s.check_and_meter(watching(month_charge(50, now=now))) for _ in range(40) for s in (store, other)
        ]
        outcomes = [a.outcome for a in await asyncio.gather(*calls)]
        assert outcomes.count(Outcome.ADMITTED) == 50
        assert await crossings(store) == [(LIMIT_THRESHOLD, 80, 40), (LIMIT_THRESHOLD, 100, 50)]
    finally:
        await other.close()


async def test_a_call_watching_no_threshold_sends_no_block_and_records_nothing(store: RedisStore) -> None:
    plain = MeterRequest(CUSTOMER, (month_charge(1, now=1_767_225_600.0),), (), 60)
    key_list, args = script_arguments(plain)
    assert args[3] == "0" and keys.notify_outbox(CUSTOMER) not in key_list
    key_list, args = script_arguments(watching(month_charge(1, now=1_767_225_600.0)))
    assert args[3] == "2" and key_list[-1] == keys.notify_outbox(CUSTOMER)
    assert args[-4:] == ["pro", 80, 100, 2]
    await store.check_and_meter(
        MeterRequest(CUSTOMER, (month_charge(1, now=store.time() or 1_767_225_600.0),), (), 60)
    )
    assert await crossings(store) == []


async def test_settle_dead_letters_redrive_and_recent(store: RedisStore) -> None:
    await store.check_and_meter(watching(month_charge(1, now=store.time() or 1_767_225_600.0)))
    outbox = store.notifications
    assert await outbox.schedule_noted(1_000) == 1
    assert await outbox.claim(2_000, 30_000, 10) == [CUSTOMER]
    assert await outbox.claim(2_000, 30_000, 10) == []  # leased
    eighty, full = await outbox.pending(CUSTOMER)
    assert await outbox.settle(CUSTOMER, (eighty.crossing,)) == 1
    assert await outbox.settle(CUSTOMER, (full.crossing,), dead_reason="410 gone") == 0
    assert await outbox.release(CUSTOMER, 30_000, None)
    assert [(n.crossing, reason) for n, reason in await outbox.dead_letters()] == [
        (full.crossing, "410 gone")
    ]
    assert await outbox.redrive(3_000) == 1
    assert await outbox.dead_letters() == []
    (back,) = await outbox.pending(CUSTOMER)
    assert back == full and back.id() == full.id()
    assert await outbox.claim(3_000, 40_000, 10) == [CUSTOMER]
    assert [n.threshold for n in await outbox.recent(CUSTOMER)] == [100, 80]


async def test_the_schedule_is_rebuilt_from_the_outboxes(store: RedisStore) -> None:
    await store.check_and_meter(watching(month_charge(1, now=store.time() or 1_767_225_600.0)))
    await store.notifications.rebuild_schedule()
    assert await store.notifications.waiting() == 1


def test_the_id_is_derived_from_the_customer_and_crossing_and_the_namespace() -> None:
    notice = Notification(
        customer="acme", crossing="limit.threshold|requests-month|1767225600|80", type=LIMIT_THRESHOLD,
        name="requests-month", plan="pro", threshold=80, used=8, limit=10, window_start=1767225600,
        window_end=1769904000, at=1767225700,
    )  # fmt: skip
    assert notice.id() == notice.id("quota-sidecar") != notice.id("staging")
    assert Notification.from_record("acme", notice.crossing, notice.record()) == notice


async def test_usage_merged_from_the_journal_records_its_crossings(store: RedisStore) -> None:
    """A request kept in the local journal while the store was down (store_failure: open) keeps
    its thresholds (ledger/entry.py, "notify") and its merge records what it crossed, once."""
    now = store.time() or 1_767_225_600.0
    request = watching(month_charge(10, 9, now=now))
    entry = decode(encode(UsageEntry("e1", now, request)))
    assert isinstance(entry, UsageEntry) and entry.request.thresholds == THRESHOLDS
    assert await store.replay(entry) is Replayed.MERGED
    assert await store.replay(entry) is Replayed.REPEATED
    assert await crossings(store) == [(LIMIT_THRESHOLD, 80, 9)]
    assert await store.notifications.schedule_noted(1) == 1


async def test_usage_records_record_their_crossings_once(store: RedisStore) -> None:
    """record.lua (SPEC §8) counts records like proxied usage and watches the same thresholds,
    on its fast path (plain counters) and its checked one (enforced)."""
    now = store.time() or 1_767_225_600.0

    def records(first: int, count: int, *, enforce: bool) -> list[UsageRecord]:
        request = watching(month_charge(10, now=now))
        return [
            UsageRecord(Dedupe(b"%012d" % n, 3600), now, request, enforce)
            for n in range(first, first + count)
        ]

    assert {r.outcome for r in await store.record(records(0, 7, enforce=False))} == {RecordOutcome.ACCEPTED}
    assert await crossings(store) == []
    await store.record(records(7, 2, enforce=True))  # 8, 9: across 80%
    await store.record(records(9, 3, enforce=False))  # 10, 11, 12: across 100%, past it
    assert await crossings(store) == [(LIMIT_THRESHOLD, 80, 8), (LIMIT_THRESHOLD, 100, 10)]
    assert await store.notifications.schedule_noted(1) == 1
