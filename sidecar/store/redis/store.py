"""The Redis store: the Lua scripts of store/lua, called by SHA, one round trip per operation.

The client never retries a script: a reply lost to a timeout does not say whether the script
ran, and running it again could charge twice. A metering call whose reply was lost raises
OutcomeUnknown with the call's name and deadline; the journal entry kept for it (journal.py) is
merged, or undone, by what the store recorded of that call (lib.lua remember_call).

Every redis error and every timeout becomes StoreUnavailable here, the one translation point (in
calls.py's ``bounded``, and in pipeline.py for the scripts of the hot path, which are pipelined:
the calls of one event-loop turn share one round trip).

One store is one client stack: the hot path's batcher, and one redis-py client for everything
else, the billing outbox (outbox.py) and the stored customers (customers.py) included, reached
as ``store.outbox`` and ``store.customers``. Each operation keeps its own time bound on it
(calls.py): the store timeout for what a request waits on, BACKGROUND_TIMEOUT for the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from sidecar.errors import OutcomeUnknown, StoreUnavailable, UnansweredCall
from sidecar.store.port import (
    Admission,
    Dedupe,
    Grant,
    GrantOutcome,
    JournalEntry,
    MeterRequest,
    Recorded,
    RecordOutcome,
    Replayed,
    ScriptEntry,
    UsageEntry,
    UsageRecord,
    VoidEntry,
)
from sidecar.store.redis import codec as replies
from sidecar.store.redis import keys
from sidecar.store.redis.breaker import CircuitBreaker
from sidecar.store.redis.calls import BACKGROUND_TIMEOUT, bounded, load_script
from sidecar.store.redis.clock import StoreClock
from sidecar.store.redis.customers import RedisCustomers
from sidecar.store.redis.history import RedisHistory
from sidecar.store.redis.limit_kinds import LIMIT_KINDS
from sidecar.store.redis.notify_outbox import NotifyOutbox
from sidecar.store.redis.outbox import Outbox, fence_member
from sidecar.store.redis.pipeline import Script, ScriptBatcher
from sidecar.store.redis.records import Shapes, by_call, read_reply, record_call
from sidecar.store.redis.topology import StoreClient, Topology, close_client

T = TypeVar("T")
log = logging.getLogger("sidecar.store")
# Connections per sidecar process: enough to keep Redis busy, few enough not to crowd it with
# replicas; 64 for what requests wait on (readiness, grants, journal merges), 8 for billing and the
# stored customers (a client of their own before they shared this one).
MAX_CONNECTIONS = 64 + 8
# Seconds a merged journal entry is remembered; far longer than any outage a journal outlives.
JOURNAL_MARKER_TTL = 7 * 86400
EXPIRED = -2  # a metering script that ran after its deadline, having written nothing
MAX_DEADLINE_WAIT = 0.25  # seconds a merge waits for the deadline of the call its entry names
_REPLAYED = {1: Replayed.MERGED, 0: Replayed.REPEATED, 2: Replayed.RAN}
_VOIDED = {1: Replayed.UNDONE, 0: Replayed.NOT_RUN, 2: Replayed.BILLED}
_GRANT_OUTCOMES = {1: GrantOutcome.ADDED, 0: GrantOutcome.REPEATED, -1: GrantOutcome.CONFLICT}
_UNANSWERED = Recorded(RecordOutcome.UNAVAILABLE)


class RedisStore:
    def __init__(self, client: StoreClient, batcher: ScriptBatcher, *, timeout: float) -> None:
        self.client = client
        self._timeout = timeout
        self.breaker = CircuitBreaker()
        self._clock = StoreClock()
        # The hot path's scripts go through the batcher: one pipelined round trip per loop turn.
        self.batcher = batcher
        self._check = self.batcher.register(load_script("check_and_meter"), named=True)
        self._read = self.batcher.register(load_script("read_limits"))
        self._charge = self.batcher.register(load_script("charge"), named=True)
        self._grant = client.register_script(load_script("grant", shared=False))
        self._replay = client.register_script(load_script("replay"))
        self._void = client.register_script(load_script("void"))
        # Usage records: not named, since a record's key makes a second count of it a duplicate.
        self._record = self.batcher.register(load_script("record"))
        self._shapes = Shapes()
        self.outbox = Outbox(client)
        self.customers = RedisCustomers(client, self.batcher, breaker=self.breaker)
        self.notifications = NotifyOutbox(client)
        self.history = RedisHistory(client)

    @classmethod
    def open(cls, url: str, timeout: float) -> RedisStore:
        """The store a --redis URL names, with its own client and batcher. The client's own
        bounds are the longest any operation has (BACKGROUND_TIMEOUT); each operation is cut to
        its own (calls.py), the requests' to ``timeout``."""
        topology = Topology.parse(url)
        batcher = ScriptBatcher(topology.locator(timeout), timeout=timeout)
        client = topology.client(max(timeout, BACKGROUND_TIMEOUT), max_connections=MAX_CONNECTIONS)
        return cls(client, batcher, timeout=timeout)

    def time(self) -> float:
        return self._clock.now()

    def _deadline(self) -> float:
        """When a metering script must no longer write (store clock): half the store timeout from
        now. A call this sidecar gave up on (it waits the whole timeout) cannot have been run after
        it gave up, e.g. by a Redis that was paused and resumed with the call in its buffer; so
        usage kept in the journal for that call is not also in the store (SPEC §5)."""
        return self.time() + self._timeout / 2

    async def check_and_meter(self, request: MeterRequest) -> Admission:
        return self._admission(await self._metering(self._check, request), request)

    async def charge(self, request: MeterRequest) -> Admission:
        return self._admission(await self._metering(self._charge, request), None)

    async def _metering(self, script: Script, request: MeterRequest) -> Any:
        """One metering call; an OutcomeUnknown names the call and when it could last have run."""
        deadline = self._deadline()
        try:
            reply = await self._call(lambda: script(*script_arguments(request, deadline=deadline)))
        except OutcomeUnknown as error:
            error.call = dataclasses.replace(error.call, deadline_us=int(deadline * 1_000_000))
            raise
        if request.thresholds and int(reply[0]) == 1 and int(reply[-1]) > 0:
            self.notifications.note(request.customer_id)  # the reply's last value (check_and_meter.lua)
        return reply

    async def read_limits(self, request: MeterRequest) -> Admission:
        reply = await self._call(lambda: self._read(*script_arguments(request, usage=False)))
        return self._admission(reply, request, has_over=False)

    async def grant(self, customer_id: str, grant: Grant) -> GrantOutcome:
        record = json.dumps(
            {"meter": grant.meter, "amount": grant.amount, "expires_at": grant.expires_at}, sort_keys=True
        )
        expiry = "+inf" if grant.expires_at is None else grant.expires_at
        key_list = [
            keys.grants(customer_id),
            keys.credit_left(customer_id, grant.meter),
            keys.credit_expiries(customer_id, grant.meter),
            keys.overdraft(customer_id, grant.meter),
        ]
        reply = await self._call(
            lambda: self._grant(keys=key_list, args=[grant.id, record, grant.amount, expiry])
        )
        return _GRANT_OUTCOMES[int(reply)]

    async def record(self, records: Sequence[UsageRecord]) -> list[Recorded]:
        """Few record.lua calls, all in this loop turn's pipeline (records.py, by_call); the
        breaker is asked once for the batch, and told once how it went."""
        if not records:
            return []
        if not self.breaker.allow():
            return [_UNANSWERED] * len(records)
        positions = by_call(records, sharded=self.batcher.locator.sharded)
        groups = [[records[i] for i in group] for group in positions]
        replies = await asyncio.gather(
            *(self._record_call(group) for group in groups), return_exceptions=True
        )
        results = [_UNANSWERED] * len(records)
        for group_positions, group, reply in zip(positions, groups, replies, strict=True):
            if isinstance(reply, StoreUnavailable):
                continue
            if isinstance(reply, BaseException):
                raise reply
            for position, result in zip(group_positions, read_reply(reply, group), strict=True):
                results[position] = result
            if int(reply[-1]) > 0:  # notifications recorded (record.lua): whose is for the notifier to find
                for record in group:
                    self.notifications.note(record.request.customer_id)
        answered = [r for r in results if r is not _UNANSWERED]
        if len(answered) == len(results):
            self.breaker.succeeded()
        else:
            self.breaker.failed()
        if answered:
            self._clock.learn(answered[0].store_time)
        return results

    def _record_call(self, records: Sequence[UsageRecord]) -> asyncio.Future[Any]:
        command = record_call(self._record.sha, records, self._shapes)
        return self.batcher.send(self._record, command, keys.usage(records[0].request.customer_id))

    async def replay(self, entry: JournalEntry) -> Replayed:
        """Merge one journal entry (ledger/journal.py) once, or undo the call a void entry names.
        An entry whose call could still run waits for that call's deadline, up to
        MAX_DEADLINE_WAIT."""
        outcome = await self._replay_once(entry)
        if outcome is None and entry.call is not None:
            deadline = entry.call.deadline_us / 1_000_000
            await asyncio.sleep(min(MAX_DEADLINE_WAIT, max(0.0, deadline - self.time())))
            outcome = await self._replay_once(entry)
        if outcome is None:
            raise StoreUnavailable("a call the journal names may still run in the store; merged later")
        return outcome

    async def _replay_once(self, entry: JournalEntry) -> Replayed | None:
        """What merging the entry did; None while the call it names could still run."""
        if isinstance(entry, UsageEntry) and entry.dedupe is not None:
            return await self._replay_record(entry, entry.dedupe)
        if isinstance(entry, VoidEntry):
            key_list, args = void_arguments(entry)
            voided = await self._call(lambda: self._void(keys=key_list, args=args), counted=False)
            return _VOIDED.get(int(voided))
        key_list, args = replay_arguments(entry)
        replayed = await self._call(lambda: self._replay(keys=key_list, args=args), counted=False)
        if int(replayed) == 1 and isinstance(entry, UsageEntry) and entry.request.thresholds:
            self.notifications.note(entry.customer_id)  # it may have crossed one (replay.lua)
        return _REPLAYED.get(int(replayed))

    async def _replay_record(self, entry: UsageEntry, dedupe: Dedupe) -> Replayed:
        """A usage record kept while the store was down is merged as a record: once per its key,
        also when the same record reached the store through another replica meanwhile."""
        record = UsageRecord(dedupe, entry.at, entry.request)
        reply = await self._call(lambda: self._record_call([record]), counted=False)
        outcome = read_reply(reply, [record])[0].outcome
        return Replayed.MERGED if outcome is RecordOutcome.ACCEPTED else Replayed.REPEATED

    async def ping(self) -> None:
        """One PING, tried once more on failure: after the store restarts, each pooled connection
        fails once before it reconnects, and a PING (which changes nothing) is safe to repeat."""
        try:
            await self._call(lambda: self.client.ping())
        except StoreUnavailable:
            await self._call(lambda: self.client.ping())

    def traffic(self) -> tuple[int, int]:
        """Script calls sent through the batcher, and the round trips that carried them."""
        return self.batcher.calls, self.batcher.round_trips

    async def connect(self) -> None:
        """Open the batcher's connection and load the scripts now, so the first requests do not
        pay for it inside their store timeout; a store that is down is only logged here."""
        try:
            await self.batcher.connect()
        except StoreUnavailable as error:
            log.warning("store not reachable at startup (%s); requests will retry the connection", error)

    async def close(self) -> None:
        await self.customers.close()
        await self.batcher.close()
        await close_client(self.client)

    @property
    def circuit_open(self) -> bool:
        return self.breaker.is_open

    async def _call(self, start: Callable[[], Awaitable[T]], *, counted: bool = True) -> T:
        """Run one store operation, unless the circuit breaker says the store is down. A call not
        ``counted`` (a journal merge, up to journal.MERGE_LANES at once) neither probes nor moves
        the breaker: merges failing together, for one cluster master that is down, would open it
        for the requests of every master."""
        allowed = self.breaker.allow() if counted else not self.breaker.is_open
        if not allowed:
            raise StoreUnavailable("the store failed repeatedly; the circuit breaker is open")
        operation = start()
        try:
            if isinstance(operation, asyncio.Future):  # a batched script call: its batch has the deadline
                reply: T = await operation
            else:
                reply = await bounded(operation, self._timeout)
        except StoreUnavailable:
            if counted:
                self.breaker.failed()
            raise
        if counted:
            self.breaker.succeeded()
        return reply

    def _admission(
        self, reply: Sequence[Any], request: MeterRequest | None, *, has_over: bool = True
    ) -> Admission:
        if int(reply[0]) == EXPIRED:
            self._clock.learn(replies.store_time(reply))
            raise StoreUnavailable("the store ran the script after its deadline; it wrote nothing")
        admission = replies.admission(reply, request, has_over=has_over)
        self._clock.learn(admission.store_time)
        return admission


def void_arguments(entry: VoidEntry) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of void.lua: the call's records and the customer's void fence; the call."""
    call, customer = entry.call, entry.customer_id
    key_list = [keys.call_records(customer, call.token), keys.void_fence(customer)]
    return key_list, [call.seq, call.deadline_us, fence_member(call)]


def replay_arguments(entry: UsageEntry | ScriptEntry) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of replay.lua: the entry's marker, the records of the call it names (if it
    names one), then the metering request's own, laid out here (script_arguments) when the entry
    is a request, or as an earlier release laid them out when it kept them (ScriptEntry)."""
    customer, call = entry.customer_id, entry.call or UnansweredCall("", 0)
    records = [keys.call_records(customer, call.token)] if call.token else []
    if isinstance(entry, UsageEntry):
        request_keys, request_args = script_arguments(entry.request)
    else:
        request_keys, request_args = list(entry.keys), list(entry.args)
    key_list = [keys.journal_marker(customer, entry.id), *records, *request_keys]
    return key_list, [int(entry.at), JOURNAL_MARKER_TTL, *call.fields(), *request_args]


def script_arguments(
    request: MeterRequest, *, usage: bool = True, deadline: float = 0.0
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the metering scripts, in the layout lib.lua's parse_request reads;
    ``deadline`` (store clock, 0 for none) is when the script must no longer write. A request that
    watches thresholds ends with its notification block (flag 2), after the usage."""
    customer = request.customer_id
    hold = request.hold
    notifies = usage and bool(request.thresholds)
    key_list: list[str] = []
    args: list[Any] = [
        request.billing_interval,
        hold.id if hold else "",
        hold.ttl * 1000 if hold else 0,
        str((1 if request.holds else 0) + (2 if notifies else 0)),
        len(request.limits),
        int(deadline * 1_000_000),
    ]
    if request.holds:
        key_list += (keys.holds(customer), keys.hold_expiries(customer))
    for charge in request.limits:
        limit = charge.limit
        mode = "a" if charge.allowance else "h" if charge.enforced else "s"
        mode += "r" if charge.reserved else ""
        kind = LIMIT_KINDS[limit.algorithm]
        limit_keys, window = kind.layout(customer, charge)
        key_list += limit_keys
        args += (kind.tag, charge.amount, limit.ceiling, mode, *window)
    args.append(len(request.credits))
    for credit in request.credits:
        mode = ("h" if credit.enforced else "s") + ("r" if credit.reserved else "")
        args += (credit.amount, mode, len(credit.allowances), *(i + 1 for i in credit.allowances))
        key_list += (
            keys.credit_left(customer, credit.meter),
            keys.credit_expiries(customer, credit.meter),
            keys.overdraft(customer, credit.meter),
        )
    if usage:
        key_list.append(keys.usage(customer))
        for entry in request.usage:
            suffix = f"{entry.meter}|{entry.feature}"
            if entry.op == "uniq":
                suffix = f"{suffix}|{entry.distinct}"
            args += (suffix, entry.op, entry.amount)
    if notifies:
        key_list.append(keys.notify_outbox(customer))
        args += (request.plan, *request.thresholds, len(request.thresholds))
    return key_list, args
