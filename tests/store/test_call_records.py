"""What the store remembers of a metering call whose reply may be lost, against a real redis-server.

A metering call that writes leaves a record (lib.lua remember_call) in the list of its customer's
calls of its connection (the token the batcher gave it), under its number there. The record
holds the steps that undo the call, and is dropped once a later call on that connection says
its reply was read. The journal
looks a record up: usage kept for a call that ran is not merged again (replay.lua), and a call
whose request was answered 503 is undone if it ran (void.lua).

The calls here are sent the way the batcher sends them, with their name appended by hand, so
that a call can be "unanswered" without cutting a connection (tests/e2e/test_lost_reply.py cuts
one).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from sidecar.config.policy.windows import Period
from sidecar.errors import StoreUnavailable, UnansweredCall
from sidecar.store.port import (
    CreditCharge,
    Grant,
    Hold,
    MeterRequest,
    Outcome,
    Replayed,
    UsageCharge,
    UsageEntry,
    VoidEntry,
)
from sidecar.store.redis import keys
from sidecar.store.redis.store import RedisStore, load_script, script_arguments
from tests.store.test_check_and_meter import month_charge, rate_charge, request_for
from tests.store.test_prepaid_credit import balance, credit, draw

TOKEN = "c0ffee0123456789"
RECORDS = keys.call_records("acme", TOKEN)


async def send_named(
    store: RedisStore,
    request: MeterRequest,
    seq: int,
    *,
    answered: int = 0,
    script: str = "check_and_meter",
    deadline: float = 0.0,
) -> Any:
    """Run a metering script as the batcher would send call `seq` on connection TOKEN, after
    reading the replies up to `answered`; the sidecar is then taken not to have read its reply."""
    key_list, args = script_arguments(request, deadline=deadline)
    source = load_script(script)
    return await store.client.eval(source, len(key_list), *key_list, *args, TOKEN, seq, answered)


def void(seq: int, deadline_us: int = 0) -> VoidEntry:
    """A journal entry for the 503 answered to the request of call `seq`."""
    return VoidEntry(uuid.uuid4().hex, "acme", 0, UnansweredCall(TOKEN, seq, deadline_us))


def journaled(request: MeterRequest, at: float, seq: int) -> UsageEntry:
    """A journal entry for usage admitted under store_failure: open when call `seq` went unanswered."""
    return UsageEntry(uuid.uuid4().hex, at, request, UnansweredCall(TOKEN, seq, 0))


async def records(store: RedisStore) -> list[bytes]:
    return list(await store.client.lrange(RECORDS, 0, -1))


async def usage(store: RedisStore) -> dict[str, int]:
    """The usage hash, each field without its window start: "<meter>|<feature>" → value, and a
    unique meter's values as "u|<meter>|<feature>|<value>" → how many requests saw it."""
    fields = await store.client.hgetall(keys.usage("acme"))
    return {_without_window(field.decode()): int(value) for field, value in fields.items()}


def _without_window(field: str) -> str:
    if field.startswith("u|"):
        return "u|" + field[2:].split("|", 1)[1]
    return field.split("|", 1)[1]


def searches(amount: int = 1) -> tuple[UsageCharge, ...]:
    return (UsageCharge("requests", "search", amount, "+"),)


async def test_an_admitted_call_leaves_one_record_under_its_connection_and_number(store: RedisStore) -> None:
    reply = await send_named(store, request_for(month_charge(10, now=store.time()), usage=searches()), 1)
    assert reply[0] == 1
    (record,) = await records(store)
    assert record.startswith(b"1 ")


async def test_a_refused_call_leaves_no_record(store: RedisStore) -> None:
    quota = month_charge(1, now=store.time())
    await send_named(store, request_for(quota), 1)
    refused = await send_named(store, request_for(quota), 2)
    assert refused[0] == 0
    assert [r.split(b" ", 1)[0] for r in await records(store)] == [b"1"]


async def test_records_are_dropped_once_a_later_call_says_their_reply_was_read(store: RedisStore) -> None:
    request = request_for(month_charge(1000, now=store.time()), usage=searches())
    for seq in range(1, 51):
        await send_named(store, request, seq, answered=seq - 1)
    assert [r.split(b" ", 1)[0] for r in await records(store)] == [b"50"], "only the last call is unread"


async def test_records_of_calls_in_flight_are_all_kept(store: RedisStore) -> None:
    request = request_for(month_charge(1000, now=store.time()), usage=searches())
    for seq in range(1, 11):
        await send_named(store, request, seq, answered=0)
    assert len(await records(store)) == 10


async def test_a_customer_among_others_in_flight_keeps_only_its_unread_records(store: RedisStore) -> None:
    """Other customers' calls in flight on the connection (seq - answered > 1) do not make this
    customer's list keep records whose replies were read: it holds one record, not up to the
    connection's calls in flight, whatever the number of customers."""
    request = request_for(month_charge(1000, now=store.time()), usage=searches())
    for seq in range(10, 510, 10):  # every tenth call is this customer's; four others in flight
        await send_named(store, request, seq, answered=seq - 5)
    assert [r.split(b" ", 1)[0] for r in await records(store)] == [b"500"]


async def test_read_records_go_and_unread_ones_stay_when_both_are_in_the_list(store: RedisStore) -> None:
    request = request_for(month_charge(1000, now=store.time()), usage=searches())
    for seq in range(1, 6):
        await send_named(store, request, seq, answered=0)
    await send_named(store, request, 6, answered=3)
    assert [r.split(b" ", 1)[0] for r in await records(store)] == [b"4", b"5", b"6"]


async def test_records_expire_an_hour_after_the_last_call(store: RedisStore) -> None:
    await send_named(store, request_for(month_charge(10, now=store.time())), 1)
    ttl = await store.client.ttl(RECORDS)
    assert 3600 - 60 < ttl <= 3600


async def test_a_void_undoes_every_write_of_a_call_that_ran(store: RedisStore) -> None:
    now = store.time()
    request = request_for(month_charge(10, now=now), rate_charge(10, Period.MINUTE), usage=searches(3))
    await store.check_and_meter(request)  # answered: stays
    await send_named(store, request, 1)  # unanswered, and ran
    assert await store.replay(void(1)) is Replayed.UNDONE
    after = await store.read_limits(request)
    assert [state.used for state in after.limits] == [1, 1]
    assert await usage(store) == {"requests|search": 3}
    assert await records(store) == []


async def test_a_second_void_of_one_call_changes_nothing(store: RedisStore) -> None:
    request = request_for(month_charge(10, now=store.time()), usage=searches())
    await store.check_and_meter(request)
    await send_named(store, request, 1)
    assert await store.replay(void(1)) is Replayed.UNDONE
    assert await store.replay(void(1)) is Replayed.NOT_RUN
    assert (await store.read_limits(request)).limits[0].used == 1


async def test_a_void_of_a_call_that_wrote_nothing_changes_nothing(store: RedisStore) -> None:
    quota = month_charge(1, now=store.time())
    await store.check_and_meter(request_for(quota, usage=searches()))
    await send_named(store, request_for(quota, usage=searches()), 1)  # refused: over the quota
    before = {key: await store.client.dump(key) for key in await store.client.keys("*")}
    assert await store.replay(void(1)) is Replayed.NOT_RUN
    assert {key: await store.client.dump(key) for key in await store.client.keys("*")} == before


async def test_a_void_waits_until_the_call_can_no_longer_run(store: RedisStore) -> None:
    request = request_for(month_charge(10, now=store.time()))
    deadline = store.time() + 30
    await send_named(store, request, 1, deadline=deadline)
    with pytest.raises(StoreUnavailable, match="may still run"):
        await store.replay(void(1, int(deadline * 1_000_000)))
    assert (await store.read_limits(request)).limits[0].used == 1, "kept in the journal for later"
    assert len(await records(store)) == 1


async def test_a_void_whose_call_is_just_short_of_its_deadline_waits_for_it(store: RedisStore) -> None:
    request = request_for(month_charge(10, now=store.time()), usage=searches())
    deadline = store.time() + 0.2
    await send_named(store, request, 1, deadline=deadline)
    assert await store.replay(void(1, int(deadline * 1_000_000))) is Replayed.UNDONE
    assert (await store.read_limits(request)).limits[0].used == 0


async def test_a_void_takes_its_fence_on_billing_with_it(store: RedisStore) -> None:
    await send_named(store, request_for(usage=searches()), 1)
    await store.client.sadd(keys.void_fence("acme"), f"{TOKEN}:1", "another:7")
    assert await store.replay(void(1)) is Replayed.UNDONE
    assert await store.client.smembers(keys.void_fence("acme")) == {b"another:7"}


async def test_a_void_gives_back_prepaid_credit_drawn(store: RedisStore) -> None:
    await store.grant("acme", Grant(id="order-1", meter="tokens", amount=100))
    await send_named(store, draw(credit(30)), 1)
    assert await balance(store) == 70
    assert await store.replay(void(1)) is Replayed.UNDONE
    assert await balance(store) == 100


async def test_a_void_releases_the_reservation_the_call_made(store: RedisStore) -> None:
    await store.grant("acme", Grant(id="order-1", meter="tokens", amount=100))
    await send_named(store, draw(credit(40, reserved=True), hold=Hold("r1", 60)), 1)
    assert await balance(store) == 60
    assert await store.replay(void(1)) is Replayed.UNDONE
    assert await balance(store) == 100
    assert not await store.client.hexists(keys.holds("acme"), "r1")
    await store.charge(draw(credit(40), hold=Hold("r1", 0)))  # a late settle charges only the real amount
    assert await balance(store) == 60


async def test_a_void_takes_back_an_overdraft(store: RedisStore) -> None:
    await store.grant("acme", Grant(id="order-1", meter="tokens", amount=10))
    soft = CreditCharge("tokens", 15, enforced=False)  # admitted past the credit: 5 overdrawn
    await send_named(store, draw(soft), 1)
    assert await balance(store) == -5
    assert await store.replay(void(1)) is Replayed.UNDONE
    assert await balance(store) == 10


async def test_a_void_keeps_a_unique_value_another_request_also_saw(store: RedisStore) -> None:
    seen = (UsageCharge("users", "search", 1, "uniq", "alice"),)
    await store.check_and_meter(request_for(usage=seen))
    await send_named(store, request_for(usage=seen), 1)
    assert await store.replay(void(1)) is Replayed.UNDONE
    assert len(await usage(store)) == 1, "alice is still counted once"
    await send_named(store, request_for(usage=(UsageCharge("users", "search", 1, "uniq", "bob"),)), 2)
    assert await store.replay(void(2)) is Replayed.UNDONE
    assert len(await usage(store)) == 1, "bob, seen only by the voided call, is gone"


async def test_a_void_restores_the_maximum_its_call_raised(store: RedisStore) -> None:
    await store.check_and_meter(request_for(usage=(UsageCharge("biggest", "search", 3, "max"),)))
    await send_named(store, request_for(usage=(UsageCharge("biggest", "search", 5, "max"),)), 1)
    assert await usage(store) == {"biggest|search": 5}
    assert await store.replay(void(1)) is Replayed.UNDONE
    assert await usage(store) == {"biggest|search": 3}


async def test_a_void_leaves_a_call_whose_usage_billing_has_already_and_all_it_counted(
    store: RedisStore,
) -> None:
    request = request_for(month_charge(10, now=store.time()), usage=searches(4))
    await send_named(store, request, 1)
    await store.client.delete(keys.usage("acme"))  # as close.lua moves a closed window to the outbox
    assert await store.replay(void(1)) is Replayed.BILLED
    assert (await store.read_limits(request)).limits[0].used == 1, "billed and counted stay equal"
    assert await usage(store) == {}, "no negative usage is left to bill"


async def test_usage_journaled_for_a_call_that_ran_is_not_merged_again(store: RedisStore) -> None:
    now = store.time()
    request = request_for(month_charge(10, now=now), usage=searches())
    await send_named(store, request, 1)
    assert await store.replay(journaled(request, now, 1)) is Replayed.RAN
    assert (await store.read_limits(request)).limits[0].used == 1
    assert await usage(store) == {"requests|search": 1}
    assert await records(store) == []


async def test_usage_journaled_for_a_call_that_never_ran_is_merged_once(store: RedisStore) -> None:
    now = store.time()
    request = request_for(month_charge(10, now=now), usage=searches())
    entry = journaled(request, now, 1)
    assert [await store.replay(entry) for _ in range(2)] == [Replayed.MERGED, Replayed.REPEATED]
    assert (await store.read_limits(request)).limits[0].used == 1


async def test_a_response_charge_that_ran_is_not_merged_again_from_the_journal(store: RedisStore) -> None:
    now = store.time()
    request = request_for(month_charge(10, 250, now=now), usage=searches(250))
    reply = await send_named(store, request, 1, script="charge")
    assert reply[0] == 1
    assert await store.replay(journaled(request, now, 1)) is Replayed.RAN
    assert await usage(store) == {"requests|search": 250}


async def test_the_stores_own_calls_leave_records_only_while_their_replies_are_unread(
    store: RedisStore,
) -> None:
    request = request_for(month_charge(1000, now=store.time()), usage=searches())
    for _ in range(20):
        assert (await store.check_and_meter(request)).outcome is Outcome.ADMITTED
    (key,) = await store.client.keys(keys.call_records("acme", "*"))
    assert await store.client.llen(key) == 1, "each call dropped the records of the replies read before it"
