"""The background pusher: close finished windows, push their summaries, settle what billing answered.

Each cycle (every second, or at once while a backlog remains) it
1. records which customers this process charged (DirtyMarks) in the shared DIRTY schedule;
2. closes every due customer's windows that ended `grace` seconds ago into its outbox, except a
   customer some journal holds a void for (journal.py: that undo must reach the usage first),
   and not at all for CLOSE_SETTLE_SECONDS after a cycle found the store down, while the
   replicas that lost replies to the outage write their fences;
3. pushes in rounds, PUSH_LANES side by side for up to PUSH_SECONDS_PER_CYCLE: a round leases up
   to CUSTOMERS_PER_ROUND pending customers (one replica at a time each), encodes their
   summaries in batches as large as the format takes, and sends them concurrently within the
   billing system's limits (sender.py); a 2xx (or a format's "already have it") deletes them, a
   permanent 4xx moves them to dead letters, anything else reschedules them with exponential
   backoff and jitter, never before a Retry-After.
A summary is deleted only after billing acknowledged it, so a crash at any point leads to a resend
with the same id and value (which a receiver deduplicating on the id counts once), never a loss.

Throughput: the lanes keep requests in flight while other rounds read and settle their outboxes,
so one replica delivers thousands of summaries a second to a receiver 100 ms away, or as many as
its documented rate allows (BENCHMARKS.md, 'Billing delivery').
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import TypeVar

import aiohttp

from sidecar.admission.customers import CustomerDirectory
from sidecar.billing.formats import Delivery, Format, encode, format_for
from sidecar.billing.marks import DirtyMarks
from sidecar.billing.sender import PUSH_TIMEOUT, Outcome, Sender
from sidecar.billing.stripe_session import SessionRefused
from sidecar.config.policy.holder import PolicyHolder
from sidecar.config.policy.model import Billing, Customer, Policy
from sidecar.errors import StoreUnavailable
from sidecar.metrics import Metrics
from sidecar.store.port import FENCED, OutboxStore
from sidecar.store.redis import keys
from sidecar.store.summaries import Summary

log = logging.getLogger("sidecar.billing")

TICK_SECONDS = 1.0
LEASE_MS = 30_000
REBUILD_EVERY_SECONDS = 60.0
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 300.0
_CUSTOMERS_PER_CYCLE = 500  # closes per cycle
# After the store failed: long enough for every journal (ledger/merger.py renews its fences every
# 0.5 s) to fence the windows of the customers it has voids for.
CLOSE_SETTLE_SECONDS = 3.0
CUSTOMERS_PER_ROUND = 100  # leased by one round
PUSH_LANES = 8  # rounds side by side
PUSH_SECONDS_PER_CYCLE = 5.0  # then the cycle closes windows again, and goes on at once
STORE_CALLS_IN_FLIGHT = 8  # settles at once over every lane: the store client's share for billing
PENDING_GAUGE_EVERY_SECONDS = 5.0  # sidecar_billing_pending_summaries reads up to 1,000 outboxes
# A round's last request starts this long before its lease ends, so it is answered (or has timed
# out) while the lease still keeps other replicas off the customer.
ROUND_MARGIN_SECONDS = (PUSH_TIMEOUT.total or 10.0) + 5.0

A = TypeVar("A")
T = TypeVar("T")


class Pusher:
    def __init__(
        self,
        *,
        backoff_base: float = BACKOFF_BASE_SECONDS,
        holder: PolicyHolder,
        outbox: OutboxStore,
        marks: DirtyMarks,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        clock: Callable[[], float],
        directory: CustomerDirectory,
        secret: str | None = None,
        token: str | None = None,
        held_back: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self.holder = holder
        self.outbox = outbox
        self.marks = marks
        self.metrics = metrics
        self.clock = clock
        self.directory = directory
        self.token = token
        self.backoff_base = backoff_base
        self.held_back = held_back  # customers this process's journal holds voids for
        self.sender = Sender(session, metrics, secret=secret)
        self._closes_resume = 0.0  # monotonic time; see CLOSE_SETTLE_SECONDS
        self._failures: dict[str, int] = {}
        self._next_rebuild = 0.0
        self._next_gauge = 0.0
        self._store_slots = asyncio.Semaphore(STORE_CALLS_IN_FLIGHT)
        self._oldest: float | None = None  # the oldest window end pushed since the last close step

    async def run(self, stopping: asyncio.Event) -> None:
        """Until `stopping` is set: closing every TICK_SECONDS and PUSH_LANES pushing lanes, side by
        side, each lane going on at once while rounds come back full. A store or billing outage
        only delays the next step, and an unexpected error is logged rather than ending billing
        for the process's lifetime."""
        lanes = [self._repeat(self._push_step, stopping) for _ in range(PUSH_LANES)]
        await _together([self._repeat(self._close_step, stopping), *lanes])

    async def cycle(self) -> None:
        """Close what is due, then push until no customer is due (or PUSH_SECONDS_PER_CYCLE is up):
        one pass, for a shutdown's last cycle and for tests."""
        await self._close_step()
        stop_at = time.monotonic() + PUSH_SECONDS_PER_CYCLE
        await _together([self._push_until(stop_at) for _ in range(PUSH_LANES)])

    async def _repeat(self, step: Callable[[], Awaitable[bool]], stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                busy = await step()
            except Exception:
                busy = False
                log.exception("billing step failed; retrying")
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), TICK_SECONDS)

    async def _push_until(self, stop_at: float) -> None:
        while time.monotonic() < stop_at and await self._push_step():
            pass

    async def _close_step(self) -> bool:
        """Record marks, rebuild the schedules now and then, close due windows; False (paced)."""
        policy = self.holder.current
        if policy.billing is not None:
            await self._guarded(self._close_pass(policy, policy.billing))
        return False

    async def _push_step(self) -> bool:
        """One round; True when it came back full (more customers are due)."""
        policy = self.holder.current
        if policy.billing is None:
            return False
        leased = await self._guarded(self._round(policy, policy.billing))
        return leased == CUSTOMERS_PER_ROUND

    async def _guarded(self, step: Awaitable[T]) -> T | None:
        """A step's result, or None when the store was down (counted, logged, and closes wait
        CLOSE_SETTLE_SECONDS for the journals' fences)."""
        try:
            return await step
        except StoreUnavailable as error:
            self.metrics.store_errors.labels("billing").inc()
            self._closes_resume = time.monotonic() + CLOSE_SETTLE_SECONDS
            log.warning("billing step skipped: %s", error)
            return None

    async def _close_pass(self, policy: Policy, billing: Billing) -> None:
        now_ms = int(self.clock() * 1000)
        await self._flush_marks()
        if time.monotonic() >= self._next_rebuild:
            await self.outbox.rebuild_schedules()
            self._next_rebuild = time.monotonic() + REBUILD_EVERY_SECONDS
        if time.monotonic() >= self._closes_resume:
            await self._close_due(policy, billing, now_ms)
        if time.monotonic() >= self._next_gauge:
            self.metrics.billing_pending.set(await self.outbox.pending_summaries())
            self._next_gauge = time.monotonic() + PENDING_GAUGE_EVERY_SECONDS
        oldest, self._oldest = self._oldest, None
        self.metrics.billing_oldest_age.set(0.0 if oldest is None else max(0.0, self.clock() - oldest))

    async def _flush_marks(self) -> None:
        dues = self.marks.take()
        try:
            await self.outbox.mark_dirty(dues)
        except StoreUnavailable:
            self.marks.put_back(dues)
            raise

    async def _close_due(self, policy: Policy, billing: Billing, now_ms: int) -> None:
        aggregations = {name: meter.aggregation.value for name, meter in policy.meters.items()}
        held_back = self.held_back()
        due = await self.outbox.due_dirty(now_ms, _CUSTOMERS_PER_CYCLE)
        customers = await self.directory.customers((c for c, _ in due), policy, retired=True)

        async def close(due_customer: tuple[str, int]) -> None:
            customer, seen = due_customer
            if customer in held_back:  # due again next cycle, behind the customers due now
                await self.outbox.reschedule(keys.DIRTY, customer, seen, now_ms + int(TICK_SECONDS * 1000))
            else:
                await self._close_one(billing, aggregations, customers.get(customer), customer, seen, now_ms)

        await self._each(close, due)

    async def _close_one(
        self,
        billing: Billing,
        aggregations: Mapping[str, str],
        known: Customer | None,
        customer: str,
        seen: int,
        now_ms: int,
    ) -> None:
        plan = known.plan if known else ""
        moved, open_window = await self.outbox.close(
            customer,
            plan,
            billing.interval,
            now_ms // 1000 - billing.grace,
            aggregations,
            anchor_day=_anchor_day(known),
            namespace=billing.namespace,
            history_days=self.holder.current.history_days,
        )
        if moved == FENCED:  # due again next cycle, behind the customers due now
            await self.outbox.reschedule(keys.DIRTY, customer, seen, now_ms + int(TICK_SECONDS * 1000))
            return
        if moved:
            await self.outbox.schedule_push(customer, now_ms)
        due = None if open_window is None else (open_window + billing.interval + billing.grace) * 1000
        await self.outbox.reschedule(keys.DIRTY, customer, seen, due)

    async def _round(self, policy: Policy, billing: Billing) -> int:
        """Lease, send and settle one round of customers; returns how many were leased."""
        now_ms = int(self.clock() * 1000)
        lease_end = now_ms + LEASE_MS
        deadline = time.monotonic() + LEASE_MS / 1000 - ROUND_MARGIN_SECONDS
        claimed = await self.outbox.claim_pending(now_ms, lease_end, CUSTOMERS_PER_ROUND)
        batches = await self.outbox.summaries_of(claimed)
        waiting = dict(zip(claimed, batches, strict=True))
        summaries = [summary for batch in batches for summary in batch]
        self._note_oldest(summaries)
        outcomes = await self._deliver(policy, billing, summaries, deadline)
        now_ms = int(self.clock() * 1000)

        async def settle(customer: str) -> tuple[str, int, int | None]:
            return customer, lease_end, await self._settle(customer, waiting[customer], outcomes, now_ms)

        await self.outbox.reschedule_many(keys.PENDING, await self._each(settle, claimed))
        return len(claimed)

    def _note_oldest(self, summaries: Sequence[Summary]) -> None:
        ends = [summary.window_end for summary in summaries]
        if self._oldest is not None:
            ends.append(int(self._oldest))
        self._oldest = min(ends, default=None)

    async def _deliver(
        self, policy: Policy, billing: Billing, summaries: Sequence[Summary], deadline: float
    ) -> dict[str, Outcome]:
        """Each summary's outcome: sent in batches as large as the format takes, or refused here
        when its customer cannot be named to the billing system."""
        fmt = format_for(billing)
        customers = await self.directory.customers({s.customer for s in summaries}, policy, retired=True)
        outcomes: dict[str, Outcome] = {}
        sendable = []
        for summary in summaries:
            if _addressable(fmt, customers, summary):
                sendable.append(summary)
            else:
                reason = f"customer '{summary.customer}' is not in the policy, or has no {fmt.customer_field}"
                outcomes[summary.id] = Outcome(Delivery.REJECTED, reason)
        if sendable:
            outcomes.update(await self._send(fmt, billing, customers, sendable, deadline))
        return outcomes

    async def _send(
        self,
        fmt: Format,
        billing: Billing,
        customers: Mapping[str, Customer],
        summaries: Sequence[Summary],
        deadline: float,
    ) -> dict[str, Outcome]:
        try:
            token = await self.sender.session_token(fmt, billing.url, self.token)
        except SessionRefused as error:
            log.warning("billing push of %d summaries: retry (%s)", len(summaries), error)
            return dict.fromkeys((summary.id for summary in summaries), Outcome(Delivery.RETRY, str(error)))
        size = min(billing.batch_size, fmt.max_batch or billing.batch_size)
        requests = [
            request
            for start in range(0, len(summaries), size)
            for request in encode(billing, summaries[start : start + size], customers, token=token)
        ]
        return await self.sender.send(fmt, requests, self.token, deadline)

    async def _settle(
        self, customer: str, batch: Iterable[Summary], outcomes: Mapping[str, Outcome], now_ms: int
    ) -> int | None:
        """Ack or dead-letter what billing answered for; when the customer is due again (None:
        its outbox is empty)."""
        by_outcome: dict[Delivery, list[str]] = {}
        for summary in batch:
            delivery = outcomes.get(summary.id, _UNSENT).delivery
            by_outcome.setdefault(delivery, []).append(summary.id)
        remaining = await self.outbox.settle(customer, tuple(by_outcome.get(Delivery.DELIVERED, ())))
        rejected = tuple(by_outcome.get(Delivery.REJECTED, ()))
        if rejected:
            reason = outcomes[rejected[0]].reason
            remaining = await self.outbox.settle(customer, rejected, dead_reason=reason)
            self.metrics.billing_dead_letters.inc(len(rejected))
        retried = [outcomes.get(i, _UNSENT) for i in by_outcome.get(Delivery.RETRY, ())]
        return self._next_push(customer, retried, remaining, now_ms)

    def _next_push(
        self, customer: str, retried: Sequence[Outcome], remaining: int, now_ms: int
    ) -> int | None:
        """None when the outbox is empty; now when more is waiting; later, backing off, after a
        failure; never before a retry the receiver asked for (Retry-After)."""
        if not retried:
            self._failures.pop(customer, None)
            return None if remaining == 0 else now_ms
        due = max(now_ms, *(int(outcome.not_before * 1000) for outcome in retried))
        if not any(outcome.failed for outcome in retried):
            return due
        failures = self._failures[customer] = self._failures.get(customer, 0) + 1
        delay = min(BACKOFF_CAP_SECONDS, self.backoff_base * 2 ** (failures - 1))
        return max(due, now_ms + int(delay * random.uniform(0.5, 1.0) * 1000))

    async def _each(self, call: Callable[[A], Awaitable[T]], items: Sequence[A]) -> list[T]:
        """``call`` for every item side by side (store calls: at most STORE_CALLS_IN_FLIGHT at once
        over every lane); the results in order. The first failure cancels the rest and is raised."""

        async def bounded(item: A) -> T:
            async with self._store_slots:
                return await call(item)

        return await _together(bounded(item) for item in items)


_UNSENT = Outcome(Delivery.RETRY, "not sent")


async def _together(work: Iterable[Coroutine[object, object, T]]) -> list[T]:
    """Run coroutines side by side; their results in order. The first failure cancels the rest,
    which have ended when it is raised (as itself: a StoreUnavailable stays one)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in work]
    except BaseExceptionGroup as failures:
        raise _first(failures) from None
    return [task.result() for task in tasks]


def _first(failures: BaseExceptionGroup[BaseException]) -> BaseException:
    first = failures.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def _anchor_day(customer: Customer | None) -> int:
    """The day a customer's billing month starts on (their billing_anchor's; the 1st without one),
    which a unique meter's first sightings are counted by."""
    anchor = customer.billing_anchor if customer is not None else None
    return anchor.day if anchor is not None else 1


def _addressable(fmt: Format, customers: Mapping[str, Customer], summary: Summary) -> bool:
    """A format with a customer field (Stripe, Lago) needs the customer, with that field filled,
    from the policy or the store; one keyed by our own customer id (json, openmeter) does not."""
    field = fmt.customer_field
    if field is None:
        return True
    customer = customers.get(summary.customer)
    return customer is not None and bool(getattr(customer, field, None))
