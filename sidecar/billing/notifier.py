"""The notifier: delivers the threshold notifications the metering scripts recorded (SPEC §9).

Each cycle (every second, or at once while a round comes back full) it
1. puts the customers this process's metering replies noted on the shared schedule
   (store/redis/notify_outbox.py), and now and then rebuilds the schedule by scanning;
2. leases up to CUSTOMERS_PER_ROUND due customers (one replica at a time each) and, for each,
   POSTs its waiting notifications oldest first, one a request (billing/notices.py);
3. settles: a 2xx deletes a notification; a permanent 4xx moves it to dead letters (listed and
   re-driven through the admin API); a 5xx, 408, 425, 429, timeout or connection error stops the
   customer's round and reschedules it with exponential backoff and jitter (1 s, 2 s, 4 s, up to
   5 minutes), never before a Retry-After in seconds.
A notification is deleted only after the receiver acknowledged it, so a crash leads to a resend
with the same id, never a loss; which crossings exist was decided once, in the metering scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp

from sidecar.billing.notices import notice_request
from sidecar.config.policy.holder import PolicyHolder
from sidecar.config.policy.model import Policy
from sidecar.config.policy.notifications import Notifications
from sidecar.errors import StoreUnavailable
from sidecar.metrics import Metrics
from sidecar.store.notifications import Notification, NotifyStore
from sidecar.store.summaries import DEFAULT_NAMESPACE

log = logging.getLogger("sidecar.notifications")

TICK_SECONDS = 1.0
LEASE_MS = 30_000
CUSTOMERS_PER_ROUND = 50
SENDS_IN_FLIGHT = 8  # customers delivered side by side; one customer's notifications go in order
REBUILD_EVERY_SECONDS = 60.0
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 300.0
SEND_TIMEOUT = aiohttp.ClientTimeout(total=10)
# No request starts later than this before the lease ends, so every answer (or its timeout) comes
# while the lease still keeps other replicas off the customer: no notification is sent twice at once.
LEASE_MARGIN_MS = 15_000
_RETRIED = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class Answer:
    """What one POST's answer means: delivered, refused for good (``dead``), or to retry."""

    delivered: bool
    dead: bool = False
    reason: str = ""
    retry_after: float = 0.0


MORE = Answer(delivered=False, reason="the lease ends before the rest could be sent")  # due again now


def classify(status: int, text: str, headers: Mapping[str, str]) -> Answer:
    if 200 <= status < 300:
        return Answer(delivered=True)
    reason = f"HTTP {status}: {text[:200]}"
    if status < 500 and status not in _RETRIED:
        return Answer(delivered=False, dead=True, reason=reason)
    return Answer(delivered=False, reason=reason, retry_after=_seconds(headers.get("Retry-After")))


def _seconds(value: str | None) -> float:
    """A Retry-After in seconds (an HTTP-date is not worth a clock here: backoff covers it)."""
    return float(min(int(value), BACKOFF_CAP_SECONDS)) if value and value.isdigit() else 0.0


def namespace_of(policy: Policy) -> str:
    """billing.namespace, which enters notification ids as it enters summary ids."""
    return policy.billing.namespace if policy.billing is not None else DEFAULT_NAMESPACE


class Notifier:
    def __init__(
        self,
        *,
        holder: PolicyHolder,
        outbox: NotifyStore,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        clock: Callable[[], float],
        secret: str | None = None,
        backoff_base: float = BACKOFF_BASE_SECONDS,
    ) -> None:
        self.holder = holder
        self.outbox = outbox
        self.session = session
        self.metrics = metrics
        self.clock = clock
        self.secret = secret
        self.backoff_base = backoff_base
        self._failures: dict[str, int] = {}
        self._next_rebuild = 0.0
        self._slots = asyncio.Semaphore(SENDS_IN_FLIGHT)

    async def run(self, stopping: asyncio.Event) -> None:
        """Until ``stopping`` is set; an outage of the store or the receiver only delays the next
        cycle, and an unexpected error is logged rather than ending notifications for good."""
        while not stopping.is_set():
            try:
                busy = await self.cycle()
            except StoreUnavailable as error:
                busy = False
                log.warning("notifications wait for the store: %s", error)
            except Exception:
                busy = False
                log.exception("notification cycle failed; retrying")
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), TICK_SECONDS)

    async def cycle(self) -> bool:
        """Schedule what was noted, lease a round of customers and deliver theirs; True when the
        round came back full (more are due)."""
        now_ms = int(self.clock() * 1000)
        await self.outbox.schedule_noted(now_ms)
        policy = self.holder.current
        if policy.notifications is None:
            return False
        await self._rebuild_now_and_then()
        lease_end = now_ms + LEASE_MS
        customers = await self.outbox.claim(now_ms, lease_end, CUSTOMERS_PER_ROUND)
        settings = (policy.notifications, namespace_of(policy))
        await asyncio.gather(*(self._customer(c, lease_end, *settings) for c in customers))
        return len(customers) == CUSTOMERS_PER_ROUND

    async def _rebuild_now_and_then(self) -> None:
        if time.monotonic() >= self._next_rebuild:
            self._next_rebuild = time.monotonic() + REBUILD_EVERY_SECONDS
            await self.outbox.rebuild_schedule()

    async def _customer(self, customer: str, lease_end: int, notify: Notifications, namespace: str) -> None:
        """Deliver one customer's notifications in order; the first that must be retried stops
        the round (the receiver is likely down), and the lease ends with the next due time."""
        async with self._slots:
            try:
                retry = await self._deliver(customer, lease_end, notify, namespace)
            except StoreUnavailable as error:
                log.warning("notifications of %s wait for the store: %s", customer, error)
                return  # the lease runs out, and the customer is taken again
            await self.outbox.release(customer, lease_end, self._next_due(customer, retry))

    async def _deliver(
        self, customer: str, lease_end: int, notify: Notifications, namespace: str
    ) -> Answer | None:
        """None when every notification was settled (delivered or dead); MORE when the lease ends
        first; else the answer to retry."""
        for notice in await self.outbox.pending(customer):
            if self.clock() * 1000 > lease_end - LEASE_MARGIN_MS:
                return MORE
            answer = await self._send(notice, notify, namespace)
            if not answer.delivered and not answer.dead:
                self.metrics.notifications.labels("retry").inc()
                log.warning(
                    "notification %s to %s: %s; retried later", notice.crossing, notify.url, answer.reason
                )
                return answer
            await self.outbox.settle(
                customer, (notice.crossing,), dead_reason=answer.reason if answer.dead else None
            )
            self.metrics.notifications.labels("delivered" if answer.delivered else "rejected").inc()
        return None

    async def _send(self, notice: Notification, notify: Notifications, namespace: str) -> Answer:
        request = notice_request(notice, notify.format, namespace, secret=self.secret, now=int(self.clock()))
        try:
            async with self.session.post(
                notify.url, data=request.body, headers=request.headers, timeout=SEND_TIMEOUT
            ) as response:
                return classify(response.status, await response.text(errors="replace"), response.headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            return Answer(delivered=False, reason=f"{type(error).__name__}: {error}")

    def _next_due(self, customer: str, retry: Answer | None) -> int | None:
        """None (off the schedule) once all was settled; else after the backoff and any Retry-After.
        A notification recorded meanwhile rescheduled the customer itself (schedule_noted)."""
        if retry is None:
            self._failures.pop(customer, None)
            return None
        if retry is MORE:
            return int(self.clock() * 1000)
        failures = self._failures.get(customer, 0) + 1
        self._failures[customer] = failures
        delay = min(BACKOFF_CAP_SECONDS, self.backoff_base * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
        return int((self.clock() + max(delay, retry.retry_after)) * 1000)
