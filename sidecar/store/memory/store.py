"""MemoryStore: the Store port in memory, admission's part of it, with the Lua scripts' semantics.

It mirrors lib.lua, check_and_meter.lua, charge.lua, read_limits.lua and grant.lua:

* a rate limit (second, minute, hour) is a moving window: a log of (microseconds, amount)
  entries, of which those inside (now - window, now] count, so at most the ceiling is admitted
  in any window of that length; a calendar quota (day, week, month) is one counter per window,
  keyed by the window's start;
* a call whose calendar window does not contain the store's time is STALE and writes nothing;
* a refusal writes nothing (only reservations past their expiry are released, as in Redis);
* soft and shadow limits (not ``enforced``) and period allowances are charged but never refuse;
* prepaid credit is drawn after its allowances, grants earliest expiry first, then an overdraft
  that the next grant pays off; reservations are undone when settled, released or expired.

Each call runs to its end without awaiting, so it is atomic under asyncio as a script is in
Redis. The clock (``clock``, epoch seconds) is injectable; windows are judged by it. Stored
customers are kept in memory too (customers.py), so ``compose`` builds the components around it.
Out of scope: journal replay (lost replies exist only across a network) and the billing outbox,
which only RedisStore has.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sidecar.config.policy.model import Algorithm
from sidecar.errors import StoreUnavailable
from sidecar.store.history import HistoryStore
from sidecar.store.memory.customers import MemoryCustomers
from sidecar.store.memory.limits import MICRO, LimitKind, LimitRead, Now, Undo, limit_kinds, needed
from sidecar.store.notifications import NotifyStore
from sidecar.store.port import (
    Admission,
    CreditCharge,
    CreditState,
    Grant,
    GrantOutcome,
    Hold,
    LimitCharge,
    MeterRequest,
    OutboxStore,
    Outcome,
    Recorded,
    RecordOutcome,
    Replayed,
    Store,
    UsageCharge,
    UsageRecord,
)

MAX_RELEASED = 32  # expired reservations released per call, as lib.lua release_expired_holds


@dataclass(slots=True)
class _Grants:
    """The prepaid credit of one (customer, meter)."""

    left: dict[str, int] = field(default_factory=dict)
    granted: dict[str, int] = field(default_factory=dict)
    expiry: dict[str, float] = field(default_factory=dict)  # unix seconds; inf for never
    overdraft: int = 0

    def in_force(self, now_s: int) -> list[str]:
        """Grant ids that still count, in drawing order: earliest expiry first, then by id."""
        return sorted((i for i, at in self.expiry.items() if at > now_s), key=lambda i: (self.expiry[i], i))

    def drop_expired(self, now_s: int) -> None:
        for grant_id in [i for i, at in self.expiry.items() if at <= now_s]:
            del self.left[grant_id], self.granted[grant_id], self.expiry[grant_id]

    def add(self, grant: Grant) -> None:
        """A new grant, which first pays off what was used beyond every grant before it."""
        paid = min(max(self.overdraft, 0), grant.amount)
        self.overdraft -= paid
        self.left[grant.id], self.granted[grant.id] = grant.amount - paid, grant.amount
        self.expiry[grant.id] = math.inf if grant.expires_at is None else grant.expires_at

    def take(self, ids: list[str], amount: int, steps: list[Undo]) -> None:
        """Draw ``amount`` from the grants ``ids`` in order, the rest as overdraft (lib.lua draw)."""
        for grant_id in ids:
            taken = min(self.left[grant_id], amount)
            if taken > 0:
                self.left[grant_id] -= taken
                amount -= taken
                steps.append(functools.partial(self.give_back, grant_id, taken))
        if amount > 0:
            self.overdraft += amount
            steps.append(functools.partial(self.forgive, amount))

    def give_back(self, grant_id: str, amount: int) -> None:
        if grant_id in self.left:  # a grant dropped since has nothing to give back to
            self.left[grant_id] += amount

    def forgive(self, amount: int) -> None:
        self.overdraft = max(0, self.overdraft - amount)


@dataclass(slots=True)
class _Credit:
    """One credit as one call read it (lib.lua's ``c``)."""

    charge: CreditCharge
    grants: _Grants
    ids: list[str]
    granted: int
    balance: int
    over: bool = False

    @property
    def refuses(self) -> bool:
        return self.over and self.charge.enforced

    def state(self, *, over: bool = True) -> CreditState:
        return CreditState(self.charge, self.granted, self.balance, over and self.over)


@dataclass(frozen=True, slots=True)
class _Held:
    """A reservation: what undoes it, and when (epoch ms) it is released unless settled."""

    steps: tuple[Undo, ...]
    expires_ms: int


def _allowance_room(credit: _Credit, limits: list[LimitRead]) -> int:
    """Units the credit's period allowances still cover: the least any of them has left."""
    rooms = [max(0, limits[i].charge.limit.ceiling - limits[i].used) for i in credit.charge.allowances]
    return min(rooms, default=0)


def _stale(request: MeterRequest, now: Now) -> bool:
    windows = (c.window for c in request.limits if c.window is not None)
    return any(not start <= now.s < end for start, end in windows)


class MemoryStore:
    """Admission's Store in one process's memory; ``down`` makes every call fail as an outage."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.down = False
        self.closed = False
        self._kinds: Mapping[Algorithm, LimitKind] = limit_kinds()
        self._grants: dict[tuple[str, str], _Grants] = {}
        self._grant_records: dict[tuple[str, str], str] = {}
        self._holds: dict[str, dict[str, _Held]] = {}
        self._usage: dict[str, dict[str, int]] = {}
        self._seen: dict[str, dict[int, set[bytes]]] = {}  # usage records' keys by dedupe bucket
        self._customers = MemoryCustomers()

    def time(self) -> float:
        return self._clock()

    @property
    def customers(self) -> MemoryCustomers:
        return self._customers

    @property
    def outbox(self) -> OutboxStore:
        raise NotImplementedError(
            "MemoryStore has no billing outbox: billing closes windows in Redis scripts; use RedisStore"
        )

    @property
    def notifications(self) -> NotifyStore:
        raise NotImplementedError(
            "MemoryStore records no notifications: the metering scripts decide them; use RedisStore"
        )

    @property
    def history(self) -> HistoryStore:
        raise NotImplementedError(
            "MemoryStore keeps no usage history: billing closes windows in Redis scripts; use RedisStore"
        )

    @property
    def circuit_open(self) -> bool:
        """No circuit breaker: memory never fails by itself."""
        return False

    async def ping(self) -> None:
        self._answering()

    async def close(self) -> None:
        self.closed = True

    def usage(self, customer_id: str) -> dict[str, int]:
        """The customer's billing usage, as RedisStore's usage hash holds it: field
        "<window>|<meter>|<feature>" (a unique meter's value: "u|<window>|<meter>|<feature>|<value>")."""
        return dict(self._usage.get(customer_id, {}))

    async def check_and_meter(self, request: MeterRequest) -> Admission:
        now = self._now()
        if _stale(request, now):
            return Admission(Outcome.STALE, now.at, ())
        self._release_expired_holds(request, now)
        limits, credits = self._read(request, now)
        refused = any(s.refuses for s in limits) or any(c.refuses for c in credits)
        if not refused:
            self._meter(request, limits, credits, now)
        outcome = Outcome.REFUSED if refused else Outcome.ADMITTED
        return Admission(outcome, now.at, tuple(s.state() for s in limits), tuple(c.state() for c in credits))

    async def charge(self, request: MeterRequest) -> Admission:
        now = self._now()
        if _stale(request, now):
            return Admission(Outcome.STALE, now.at, ())
        if request.holds and request.hold is not None and request.hold.id:
            self._release_hold(request.customer_id, request.hold.id)
        self._release_expired_holds(request, now)
        limits = [self._read_limit(request.customer_id, c, now) for c in request.limits]
        for limit in limits:
            if limit.charge.amount > 0 and not limit.charge.allowance:
                self._charge_limit(limit, limit.charge.amount, now)
        for charge in request.credits:
            if charge.amount > 0:
                self._draw(self._read_credit(request.customer_id, charge, now), limits, now, [])
        self._record_usage(request, now)
        return Admission(Outcome.ADMITTED, now.at, ())

    async def read_limits(self, request: MeterRequest) -> Admission:
        now = self._now()
        if _stale(request, now):
            return Admission(Outcome.STALE, now.at, ())
        limits = [self._read_limit(request.customer_id, c, now) for c in request.limits]
        credits = [self._read_credit(request.customer_id, c, now) for c in request.credits]
        states = tuple(s.state(over=False) for s in limits)
        return Admission(Outcome.ADMITTED, now.at, states, tuple(c.state(over=False) for c in credits))

    async def grant(self, customer_id: str, grant: Grant) -> GrantOutcome:
        """Add prepaid credit once per grant id; what was overdrawn is paid from it first."""
        self._answering()
        record = json.dumps(
            {"meter": grant.meter, "amount": grant.amount, "expires_at": grant.expires_at}, sort_keys=True
        )
        existing = self._grant_records.get((customer_id, grant.id))
        if existing is not None:
            return GrantOutcome.REPEATED if existing == record else GrantOutcome.CONFLICT
        self._grant_records[(customer_id, grant.id)] = record
        self._grants.setdefault((customer_id, grant.meter), _Grants()).add(grant)
        return GrantOutcome.ADDED

    async def record(self, records: Sequence[UsageRecord]) -> list[Recorded]:
        """record.lua's semantics: each record once per key (kept per customer in buckets of its
        dedupe seconds), charged at its own time; an enforced one only if everything has room."""
        if self.down or self.closed:
            return [Recorded(RecordOutcome.UNAVAILABLE)] * len(records)
        now = self._now()
        return [self._record_one(record, now) for record in records]

    def _record_one(self, record: UsageRecord, now: Now) -> Recorded:
        request, at = record.request, Now(int(record.at) * MICRO)
        bucket = now.s // record.dedupe.seconds
        seen = self._seen.setdefault(request.customer_id, {})
        if any(record.dedupe.key in seen.get(b, ()) for b in (bucket, bucket - 1)):
            return Recorded(RecordOutcome.DUPLICATE, now.at)
        limits, credits = self._read(request, at)
        states = tuple(s.state() for s in limits), tuple(c.state() for c in credits)
        if record.enforce and (any(s.refuses for s in limits) or any(c.refuses for c in credits)):
            return Recorded(RecordOutcome.REFUSED, now.at, *states)
        for limit in limits:
            if limit.charge.amount > 0 and not limit.charge.allowance:
                self._charge_limit(limit, limit.charge.amount, at)
        for credit in credits:
            if credit.charge.amount > 0:
                self._draw(credit, limits, at, [])
        self._record_usage(request, at)
        seen.setdefault(bucket, set()).add(record.dedupe.key)
        return Recorded(RecordOutcome.ACCEPTED, now.at, *states)

    async def replay(self, entry: object) -> Replayed:
        raise NotImplementedError(
            "MemoryStore does not replay journal entries: a journal keeps what a store over the "
            "network could not take; use RedisStore (tests: the redis_url fixture) to test merges"
        )

    def _answering(self) -> None:
        if self.closed:
            raise StoreUnavailable("the memory store was closed")
        if self.down:
            raise StoreUnavailable("the memory store is down (MemoryStore.down)")

    def _now(self) -> Now:
        self._answering()
        return Now(int(self._clock() * MICRO))

    def _read(self, request: MeterRequest, now: Now) -> tuple[list[LimitRead], list[_Credit]]:
        """Every limit and credit of a check, each marked over when the request does not fit."""
        customer = request.customer_id
        limits = [self._read_limit(customer, c, now) for c in request.limits]
        for limit in limits:
            limit.over = limit.used + needed(limit.charge.amount) > limit.charge.limit.ceiling
        credits = [self._read_credit(customer, c, now) for c in request.credits]
        for credit in credits:
            credit.over = needed(credit.charge.amount) > _allowance_room(credit, limits) + credit.balance
        return limits, credits

    def _meter(
        self, request: MeterRequest, limits: list[LimitRead], credits: list[_Credit], now: Now
    ) -> None:
        """Charge an admitted check: limits, then credits, the reservation, then usage."""
        held: list[Undo] = []
        for limit in limits:
            charge = limit.charge
            if charge.amount > 0 and not charge.allowance:
                step = self._charge_limit(limit, charge.amount, now)
                if charge.reserved:
                    held.append(step)
        for credit in credits:
            if credit.charge.amount > 0:
                self._draw(credit, limits, now, held if credit.charge.reserved else [])
        self._keep_hold(request, held, now)
        self._record_usage(request, now)

    def _read_limit(self, customer: str, charge: LimitCharge, now: Now) -> LimitRead:
        return self._kinds[charge.limit.algorithm].read(customer, charge, now)

    def _charge_limit(self, limit: LimitRead, amount: int, now: Now) -> Undo:
        """Add ``amount`` to one limit; returns what undoes it (for a reservation)."""
        limit.used += amount
        return self._kinds[limit.charge.limit.algorithm].add(limit, amount, now)

    def _read_credit(self, customer: str, charge: CreditCharge, now: Now) -> _Credit:
        grants = self._grants.setdefault((customer, charge.meter), _Grants())
        ids = grants.in_force(now.s)
        granted = sum(grants.granted[i] for i in ids)
        balance = sum(grants.left[i] for i in ids) - grants.overdraft
        return _Credit(charge, grants, ids, granted, balance)

    def _draw(self, credit: _Credit, limits: list[LimitRead], now: Now, steps: list[Undo]) -> None:
        """Charge a credit's amount: its allowances first, then grants in order, then overdraft;
        what undoes each part goes to ``steps``."""
        amount = credit.charge.amount
        covered = min(amount, _allowance_room(credit, limits))
        if covered > 0:
            steps += [self._charge_limit(limits[i], covered, now) for i in credit.charge.allowances]
        credit.grants.take(credit.ids, amount - covered, steps)
        credit.balance -= amount - covered
        credit.grants.drop_expired(now.s)

    def _keep_hold(self, request: MeterRequest, held: list[Undo], now: Now) -> None:
        hold: Hold | None = request.hold
        if hold is None or not hold.id or not request.holds or not held:
            return
        expires_ms = now.us // 1000 + hold.ttl * 1000
        self._holds.setdefault(request.customer_id, {})[hold.id] = _Held(tuple(held), expires_ms)

    def _release_hold(self, customer: str, hold_id: str) -> None:
        """Undo what a reservation holds, once: settled, released or expired."""
        held = self._holds.get(customer, {}).pop(hold_id, None)
        if held is not None:
            for undo in held.steps:
                undo()

    def _release_expired_holds(self, request: MeterRequest, now: Now) -> None:
        if not request.holds:
            return
        holds = self._holds.get(request.customer_id, {})
        now_ms = now.us // 1000
        expired = sorted((h.expires_ms, i) for i, h in holds.items() if h.expires_ms <= now_ms)
        for _, hold_id in expired[:MAX_RELEASED]:
            self._release_hold(request.customer_id, hold_id)

    def _record_usage(self, request: MeterRequest, now: Now) -> None:
        """Add the request's usage to the fields of its billing window (lib.lua record_usage)."""
        window = now.s - now.s % request.billing_interval
        fields = self._usage.setdefault(request.customer_id, {})
        for entry in request.usage:
            _add_usage(fields, f"{window}|{entry.meter}|{entry.feature}", entry)


def _add_usage(fields: dict[str, int], name: str, entry: UsageCharge) -> None:
    """One usage charge: "+" adds, "max" and "min" keep the extreme, "uniq" counts a sighting."""
    if entry.op == "uniq":
        seen = f"u|{name}|{entry.distinct}"
        fields[seen] = fields.get(seen, 0) + 1
    elif entry.op == "+":
        fields[name] = fields.get(name, 0) + entry.amount
    elif _beyond(entry, fields.get(name)):
        fields[name] = entry.amount


def _beyond(entry: UsageCharge, current: int | None) -> bool:
    """A max/min usage charge moves the value kept (or is the first)."""
    if current is None:
        return True
    return entry.amount > current if entry.op == "max" else entry.amount < current


if TYPE_CHECKING:  # mypy checks that MemoryStore is a Store
    _PORT: Store = MemoryStore()
