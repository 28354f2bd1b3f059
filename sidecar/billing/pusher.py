"""The background pusher: close finished windows, push their summaries, settle what billing answered.

Each cycle (every second) it
1. records which customers this process charged (DirtyMarks) in the shared DIRTY schedule;
2. closes every due customer's windows that ended `grace` seconds ago into its outbox, except a
   customer some journal holds a void for (journal.py: that undo must reach the usage first),
   and not at all for CLOSE_SETTLE_SECONDS after a cycle found the store down, while the
   replicas that lost replies to the outage write their fences;
3. leases pending customers (one replica at a time each) and POSTs their summaries in batches,
   signed when a secret is set; a 2xx (or a format's "already have it") deletes them, a permanent
   4xx moves them to dead letters, anything else reschedules them with exponential backoff and
   jitter.
A summary is deleted only after billing acknowledged it, so a crash at any point leads to a resend
with the same id and value (which a receiver deduplicating on the id counts once), never a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import aiohttp

from sidecar.admission.customers import CustomerDirectory
from sidecar.billing.formats import FORMATS, Delivery, Format, PushRequest, encode
from sidecar.billing.marks import DirtyMarks
from sidecar.billing.signing import HEADER as SIGNATURE_HEADER
from sidecar.billing.signing import signature
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
PUSH_TIMEOUT = aiohttp.ClientTimeout(total=10)
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 300.0
_CUSTOMERS_PER_CYCLE = 500
# After the store failed: long enough for every journal (ledger/merger.py renews its fences every
# 0.5 s) to fence the windows of the customers it has voids for.
CLOSE_SETTLE_SECONDS = 3.0


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
        self.session = session
        self.metrics = metrics
        self.clock = clock
        self.directory = directory
        self.secret = secret
        self.token = token
        self.backoff_base = backoff_base
        self.held_back = held_back  # customers this process's journal holds voids for
        self._closes_resume = 0.0  # monotonic time; see CLOSE_SETTLE_SECONDS
        self._failures: dict[str, int] = {}
        self._next_rebuild = 0.0

    async def run(self, stopping: asyncio.Event) -> None:
        """Cycle until `stopping` is set; a store or billing outage only delays the next cycle,
        and an unexpected error is logged rather than ending billing for the process's lifetime."""
        while not stopping.is_set():
            try:
                await self.cycle()
            except Exception:
                log.exception("billing cycle failed; retrying next cycle")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), TICK_SECONDS)

    async def cycle(self) -> None:
        policy = self.holder.current
        if policy.billing is None:
            return
        try:
            await self._cycle(policy, policy.billing)
        except StoreUnavailable as error:
            self.metrics.store_errors.labels("billing").inc()
            self._closes_resume = time.monotonic() + CLOSE_SETTLE_SECONDS
            log.warning("billing cycle skipped: %s", error)

    async def _cycle(self, policy: Policy, billing: Billing) -> None:
        now_ms = int(self.clock() * 1000)
        await self._flush_marks()
        if time.monotonic() >= self._next_rebuild:
            await self.outbox.rebuild_schedules()
            self._next_rebuild = time.monotonic() + REBUILD_EVERY_SECONDS
        if time.monotonic() >= self._closes_resume:
            await self._close_due(policy, billing, now_ms)
        await self._push_pending(policy, billing, now_ms)
        self.metrics.billing_pending.set(await self.outbox.pending_summaries())

    async def _flush_marks(self) -> None:
        dues = self.marks.take()
        try:
            await self.outbox.mark_dirty(dues)
        except StoreUnavailable:
            self.marks.put_back(dues)
            raise

    async def _close_due(self, policy: Policy, billing: Billing, now_ms: int) -> None:
        cutoff = now_ms // 1000 - billing.grace
        aggregations = {name: meter.aggregation.value for name, meter in policy.meters.items()}
        customers = self.directory.all(policy)
        held_back = self.held_back()
        for customer, seen in await self.outbox.due_dirty(now_ms, _CUSTOMERS_PER_CYCLE):
            known = customers.get(customer)
            plan = known.plan if known else ""
            if customer in held_back:
                moved, open_window = FENCED, None
            else:
                moved, open_window = await self.outbox.close(
                    customer, plan, billing.interval, cutoff, aggregations, anchor_day=_anchor_day(known)
                )
            if moved == FENCED:  # due again next cycle, behind the customers due now
                await self.outbox.reschedule(keys.DIRTY, customer, seen, now_ms + int(TICK_SECONDS * 1000))
                continue
            if moved:
                await self.outbox.schedule_push(customer, now_ms)
            due = None if open_window is None else (open_window + billing.interval + billing.grace) * 1000
            await self.outbox.reschedule(keys.DIRTY, customer, seen, due)

    async def _push_pending(self, policy: Policy, billing: Billing, now_ms: int) -> None:
        lease_end = now_ms + LEASE_MS
        claimed = await self.outbox.claim_pending(now_ms, lease_end, _CUSTOMERS_PER_CYCLE)
        waiting = {customer: await self.outbox.summaries(customer) for customer in claimed}
        summaries = [s for batch in waiting.values() for s in batch]
        oldest = min((s.window_end for s in summaries), default=None)
        self.metrics.billing_oldest_age.set(0 if oldest is None else max(0.0, now_ms / 1000 - oldest))
        outcomes = await self._deliver(policy, billing, summaries)
        for customer, batch in waiting.items():
            await self._settle(customer, batch, outcomes, lease_end, now_ms)

    async def _deliver(
        self, policy: Policy, billing: Billing, summaries: Sequence[Summary]
    ) -> dict[str, tuple[Delivery, str]]:
        """Each summary's outcome and, for a refusal, the reason billing gave."""
        outcomes: dict[str, tuple[Delivery, str]] = {}
        sendable = []
        customers = self.directory.all(policy)
        for summary in summaries:
            if _addressable(billing, customers, summary):
                sendable.append(summary)
            else:
                outcomes[summary.id] = (
                    Delivery.REJECTED,
                    f"customer '{summary.customer}' is not in the policy",
                )
        for start in range(0, len(sendable), billing.batch_size):
            batch = sendable[start : start + billing.batch_size]
            for request in encode(billing, batch, customers, token=self.token):
                outcomes.update(await self._send(FORMATS[billing.format], request))
        return outcomes

    async def _send(self, fmt: Format, request: PushRequest) -> dict[str, tuple[Delivery, str]]:
        """Each summary's outcome. A refusal that names some summaries as stored already (Lago's
        duplicates, when a crash lost our ack of an earlier batch) splits: those count as delivered
        and the rest are retried in a batch without them."""
        headers = dict(request.headers)
        if self.secret:
            headers[SIGNATURE_HEADER] = signature(self.secret, request.body, int(time.time()))
        duplicates: frozenset[int] = frozenset()
        try:
            async with self.session.post(
                request.url, data=request.body, headers=headers, timeout=PUSH_TIMEOUT
            ) as response:
                answer = await response.read()
                delivery = fmt.classify(response.status, answer, sent=len(request.summary_ids))
                reason = f"{response.status}: {answer[:500].decode(errors='replace')}"
                if delivery is Delivery.REJECTED:
                    duplicates = fmt.already_stored(answer)
        except (aiohttp.ClientError, TimeoutError) as error:
            delivery, reason = Delivery.RETRY, type(error).__name__
        self.metrics.billing_pushes.labels(delivery.value).inc()
        if delivery is not Delivery.DELIVERED:
            log.warning(
                "billing push of %d summaries: %s (%s)", len(request.summary_ids), delivery.value, reason
            )
        if duplicates:
            return {
                summary_id: (Delivery.DELIVERED if index in duplicates else Delivery.RETRY, reason)
                for index, summary_id in enumerate(request.summary_ids)
            }
        return dict.fromkeys(request.summary_ids, (delivery, reason))

    async def _settle(
        self,
        customer: str,
        batch: Iterable[Summary],
        outcomes: Mapping[str, tuple[Delivery, str]],
        lease_end: int,
        now_ms: int,
    ) -> None:
        by_outcome: dict[Delivery, list[str]] = {}
        for summary in batch:
            delivery = outcomes.get(summary.id, (Delivery.RETRY, ""))[0]
            by_outcome.setdefault(delivery, []).append(summary.id)
        remaining = await self.outbox.settle(customer, tuple(by_outcome.get(Delivery.DELIVERED, ())))
        rejected = tuple(by_outcome.get(Delivery.REJECTED, ()))
        if rejected:
            reason = next(outcomes[i][1] for i in rejected)
            remaining = await self.outbox.settle(customer, rejected, dead_reason=reason)
            self.metrics.billing_dead_letters.inc(len(rejected))
        await self.outbox.reschedule(
            keys.PENDING, customer, lease_end, self._next_push(customer, by_outcome, remaining, now_ms)
        )

    def _next_push(
        self, customer: str, by_outcome: Mapping[Delivery, list[str]], remaining: int, now_ms: int
    ) -> int | None:
        """None when the outbox is empty; now when more is waiting; later, backing off, after a failure."""
        if Delivery.RETRY not in by_outcome:
            self._failures.pop(customer, None)
            return None if remaining == 0 else now_ms
        failures = self._failures[customer] = self._failures.get(customer, 0) + 1
        delay = min(BACKOFF_CAP_SECONDS, self.backoff_base * 2 ** (failures - 1))
        return now_ms + int(delay * random.uniform(0.5, 1.0) * 1000)


def _anchor_day(customer: Customer | None) -> int:
    """The day a customer's billing month starts on (their billing_anchor's; the 1st without one),
    which a unique meter's first sightings are counted by."""
    anchor = customer.billing_anchor if customer is not None else None
    return anchor.day if anchor is not None else 1


def _addressable(billing: Billing, customers: Mapping[str, Customer], summary: Summary) -> bool:
    """A format with a customer field (Stripe, Lago) needs the customer from the policy or the
    store; one keyed by our own customer id (json, openmeter) does not."""
    needs_customer = FORMATS[billing.format].customer_field is not None
    return not needs_customer or summary.customer in customers
