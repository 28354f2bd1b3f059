"""The store contract: everything the process asks of Redis, as plain values.

``Store`` covers admission (check_and_meter, charge, read_limits, grant) and the ledger (replay);
from it, ``store.outbox`` (OutboxStore) is the billing side and ``store.customers``
(CustomerStore) the customers stored through the admin API, so one implementation, on one
client, serves them all.

A refusal is a value (``Outcome.REFUSED``), not an exception. ``StoreUnavailable`` is raised
only when the store could not answer within its timeout; the caller then applies
``store_failure``. Nothing here imports redis.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.config.policy.model import Customer, Limit
from sidecar.config.policy.notifications import DEFAULT_HISTORY_DAYS
from sidecar.config.policy.windows import Window
from sidecar.errors import UnansweredCall
from sidecar.store.history import HistoryStore
from sidecar.store.notifications import NotifyStore
from sidecar.store.summaries import DEFAULT_NAMESPACE, Summary

FENCED = -1  # OutboxStore.close moved nothing: a void fence keeps the customer's windows open


@dataclass(frozen=True, slots=True)
class LimitCharge:
    """What one request adds to one limit.

    ``window`` is the calendar window (None for rate limits). ``enforced`` is False for soft
    (on_exceed: allow) and shadow limits, which are charged but never refuse. An ``amount`` of 0
    is a response-time meter: admitted while its balance is above zero, charged later.
    ``counts_requests`` says the unit is requests (else the meter's own unit).
    """

    limit: Limit
    amount: int
    window: Window | None
    enforced: bool
    counts_requests: bool = True
    allowance: bool = False  # a period allowance of a prepaid meter: charged through its CreditCharge
    reserved: bool = False  # the amount is a reservation, undone when the request settles


@dataclass(frozen=True, slots=True)
class CreditCharge:
    """What one request draws from the prepaid credit of one meter.

    ``allowances`` index the period allowances (in MeterRequest.limits) used before credit. An
    ``amount`` of 0 is a response-time meter: admitted while allowance and credit are above zero.
    """

    meter: str
    amount: int
    enforced: bool
    allowances: tuple[int, ...] = ()
    reserved: bool = False
    counts_requests: bool = False

    @property
    def name(self) -> str:
        """The policy name clients see in RateLimit headers and 429 bodies, e.g. tokens-prepaid."""
        return f"{self.meter}-prepaid"


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation: charged at admission under ``id``, undone when the request settles, and
    released by the customer's next admission after ``ttl`` seconds if nobody settled it."""

    id: str
    ttl: int


@dataclass(frozen=True, slots=True)
class UsageCharge:
    """What one request adds to the billing summary of (meter, feature) in the current window."""

    meter: str
    feature: str
    amount: int
    op: str  # "+" adds (count, sum); "max" / "min" keep the extreme; "uniq" notes `distinct`
    distinct: str = ""  # the value a unique meter saw; counted once per window at close


@dataclass(frozen=True, slots=True)
class MeterRequest:
    """One call of a metering script. ``hold`` is the reservation made (check_and_meter) or
    settled (charge); ``holds`` says the call sweeps the customer's expired reservations."""

    customer_id: str
    limits: tuple[LimitCharge, ...]
    usage: tuple[UsageCharge, ...]
    billing_interval: int
    credits: tuple[CreditCharge, ...] = ()
    hold: Hold | None = None
    holds: bool = False
    # Threshold notifications (SPEC §9): the percentages the call watches (none: it watches
    # nothing) and the customer's plan, which each notification names.
    plan: str = ""
    thresholds: tuple[int, ...] = ()


class Outcome(enum.Enum):
    ADMITTED = "admitted"
    REFUSED = "refused"
    STALE = "stale"  # a calendar window did not contain the store's time: recompute, call again


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit after the call: ``used`` includes the request only when it was admitted."""

    charge: LimitCharge
    used: int
    reset_seconds: float
    over: bool

    @property
    def remaining(self) -> int:
        return max(0, self.charge.limit.ceiling - self.used)


@dataclass(frozen=True, slots=True)
class CreditState:
    """One prepaid credit after the call: units granted in force and the balance left, which
    includes the request only when it was admitted and may be below zero by what requests in
    flight used (SPEC section 5)."""

    charge: CreditCharge
    granted: int
    balance: int
    over: bool = False

    @property
    def used(self) -> int:
        return self.granted - self.balance


@dataclass(frozen=True, slots=True)
class Admission:
    outcome: Outcome
    store_time: float
    limits: tuple[LimitState, ...]
    credits: tuple[CreditState, ...] = ()


class RecordOutcome(enum.Enum):
    """What the store did with one usage record (Store.record)."""

    ACCEPTED = "accepted"  # counted, and its key remembered
    DUPLICATE = "duplicate"  # its key was seen within the dedupe window: counted then, not again
    REFUSED = "refused"  # enforced, and a limit or credit had no room: nothing written or remembered
    UNAVAILABLE = "unavailable"  # no answer: it may have been counted; sent again, it counts once


@dataclass(frozen=True, slots=True)
class Dedupe:
    """A usage record's identity: ``key``, a digest of its source and id (admission/records.py),
    is remembered for at least ``seconds`` (at most twice that) once the record is counted."""

    key: bytes
    seconds: int


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One usage record as the store takes it. ``request`` names the calendar windows its time
    ``at`` falls in (never a moving window: records are not rates), and its usage lands in the
    billing window of ``at``. ``enforce``: every enforced limit and credit is checked first, and
    the record is counted only if all have room, like a proxied request."""

    dedupe: Dedupe
    at: float
    request: MeterRequest
    enforce: bool = False


@dataclass(frozen=True, slots=True)
class Recorded:
    """One record's outcome; for an enforced record, its limits and credits as the check saw them
    (``over`` naming what refused it)."""

    outcome: RecordOutcome
    store_time: float = 0.0
    limits: tuple[LimitState, ...] = ()
    credits: tuple[CreditState, ...] = ()


@dataclass(frozen=True, slots=True)
class Grant:
    """Prepaid credit for one meter; ``expires_at`` (unix seconds) None for never."""

    id: str
    meter: str
    amount: int
    expires_at: int | None = None


class GrantOutcome(enum.Enum):
    ADDED = "added"
    REPEATED = "repeated"  # the same grant id and content were added before: counted once
    CONFLICT = "conflict"  # the grant id was used before for a different grant


class Replayed(enum.Enum):
    """What merging one journal entry did (Store.replay)."""

    MERGED = "merged"
    REPEATED = "repeated"  # merged before (a retried replay, or another process's)
    RAN = "ran"  # not merged: the call the entry stands for had run in the store after all
    UNDONE = "undone"  # a void: the call it names had run, and is undone
    NOT_RUN = "not_run"  # a void: the call it names had not run; nothing to undo
    BILLED = "billed"  # a void: the call had run and its window was closed first; it stands


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """Usage the store did not take, as the local journal keeps it (ledger/entry.py writes it to
    disk): the metering request itself, not a script's arguments, so that a journal written
    before an upgrade merges after it. ``call`` names the metering call sent for it whose reply
    never came: the usage is merged only if that call did not run."""

    id: str
    at: float  # when the usage happened (store clock, unix seconds)
    request: MeterRequest
    call: UnansweredCall | None = None
    # A usage record's: merged as a record (Store.record), once per its key within the dedupe
    # window, so a record also sent again to another replica counts once.
    dedupe: Dedupe | None = None

    @property
    def customer_id(self) -> str:
        return self.request.customer_id


@dataclass(frozen=True, slots=True)
class VoidEntry:
    """A request answered 503 whose metering ``call`` may have run: undone if it did."""

    id: str
    customer_id: str
    at: float
    call: UnansweredCall


@dataclass(frozen=True, slots=True)
class ScriptEntry:
    """Usage kept by the journal of an earlier release (entry versions 1 and 2): the metering
    scripts' KEYS and ARGV as they were laid out then, merged as they are."""

    id: str
    customer_id: str
    at: float
    keys: tuple[str, ...]
    args: tuple[str | int | float, ...]
    call: UnansweredCall | None = None


JournalEntry = UsageEntry | VoidEntry | ScriptEntry


class OutboxStore(Protocol):
    """The billing side of the store: close finished windows into per-customer outboxes, lease
    them to one pusher at a time, settle them once billing has answered (billing/pusher.py).

    Each per-customer step is atomic on that customer's keys. The shared schedules (DIRTY,
    PENDING, DEAD; ``schedule`` names one) are only indexes, rebuilt by ``rebuild_schedules``, so
    a step lost between a customer's keys and an index delays a summary, never loses it. Every
    call waits longer than a request can (nobody waits on it) and raises StoreUnavailable.
    """

    async def mark_dirty(self, dues: Mapping[str, int]) -> None:
        """Schedule each customer's window closing; an earlier due time wins."""

    async def due_dirty(self, now_ms: int, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` customers whose closing is due by ``now_ms``, with their due time."""

    async def close(
        self,
        customer: str,
        plan: str,
        interval: int,
        cutoff: int,
        aggregations: Mapping[str, str],
        *,
        anchor_day: int = 1,
        namespace: str = DEFAULT_NAMESPACE,
        history_days: int = DEFAULT_HISTORY_DAYS,
    ) -> tuple[int, int | None]:
        """Move every window ended by ``cutoff`` into the outbox: (moved, earliest open window),
        or (FENCED, None) while a void fence keeps the customer's windows open. A unique meter's
        value counts in the billing month (from ``anchor_day``) it is first closed in, once;
        ``namespace`` enters the summary ids (store/summaries.py); each summary is kept
        ``history_days`` as usage history (store/history.py)."""

    async def fence(self, customer: str, void: UnansweredCall, seconds: int) -> bool:
        """Keep the customer's windows open in every replica for ``seconds`` (unless renewed)
        while this void may have something to undo; False when it has nothing."""

    async def reschedule(self, schedule: str, customer: str, seen: int, new: int | None) -> bool:
        """Remove (``new`` None) or reschedule a member, only if nobody changed it since ``seen``."""

    async def reschedule_many(self, schedule: str, moves: Sequence[tuple[str, int, int | None]]) -> int:
        """``reschedule`` for each (customer, seen, new) in one call; how many changed."""

    async def schedule_push(self, customer: str, at_ms: int) -> None:
        """Due for pushing at ``at_ms``; overrides a lease, so new summaries are never left behind."""

    async def claim_pending(self, now_ms: int, lease_end_ms: int, limit: int) -> list[str]:
        """Lease up to ``limit`` customers due for pushing until ``lease_end_ms``."""

    async def summaries(self, customer: str) -> list[Summary]:
        """The summaries waiting in a customer's outbox."""

    async def summaries_of(self, customers: Sequence[str]) -> list[list[Summary]]:
        """The summaries waiting in each customer's outbox, in order, read in one round trip
        (a pusher's round of customers)."""

    async def settle(self, customer: str, ids: tuple[str, ...], *, dead_reason: str | None = None) -> int:
        """Delete delivered summaries, or dead-letter them with a reason; returns how many remain."""

    async def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead letter: the summary as it would have been sent, and why billing refused it."""

    async def redrive(self, now_ms: int) -> int:
        """Move every dead letter back into its outbox (same id, same value), scheduled to push."""

    async def pending_summaries(self, limit: int = 1000) -> int:
        """Summaries waiting in the outboxes of (at most ``limit``) pending customers."""

    async def rebuild_schedules(self) -> None:
        """Find every usage and outbox anew and make sure each is scheduled."""


class Written(enum.Enum):
    """What the store did with one customer write (CustomerStore)."""

    STORED = "stored"  # written; every replica drops what it cached of the customer
    REPEATED = "repeated"  # a key added that the customer had already
    CONFLICT = "conflict"  # a key belongs to another customer: nothing written
    NOT_FOUND = "not_found"  # no such stored customer (or not one of its keys): nothing written
    SLOW = "slow"  # the write took longer than a claim is safe for: nothing written, try again


@dataclass(frozen=True, slots=True)
class WriteResult:
    """One write's outcome; for a CONFLICT, each conflicting key's index in the customer's
    ``api_key_hashes`` with the customer that holds it."""

    outcome: Written
    owners: tuple[tuple[int, str], ...] = ()


class Deleted(enum.Enum):
    """What DELETE did (CustomerStore.delete)."""

    DELETED = "deleted"  # a live customer was deleted (and its purge scheduled, if asked)
    ALREADY = "already"  # it was deleted before (a purge asked for now is scheduled)
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class CustomerChange:
    """One entry of the changes feed, written after every change: the customers whose cached
    entries every replica drops, key hashes that were added (a replica may hold them as unknown)
    and, for an import batch, that every cached unknown key goes."""

    customers: tuple[str, ...] = ()
    key_hashes: tuple[str, ...] = ()
    unknown_keys: bool = False


@dataclass(frozen=True, slots=True)
class FeedRead:
    """What a read of the changes feed found after ``position``: the changes in order and the
    new position; ``gap`` when changes may have been missed (trimmed while this replica could
    not read), so everything cached must go."""

    position: str
    changes: tuple[CustomerChange, ...] = ()
    gap: bool = False


@dataclass(frozen=True, slots=True)
class StoredPage:
    """Stored customers with ids after a cursor, in id order; ``more`` when ids past the last
    one may follow, ``last`` the last id looked at (the next page starts after it)."""

    customers: tuple[Customer, ...]
    last: str
    more: bool


@dataclass(frozen=True, slots=True)
class Purged:
    """A purge that ran to its end: the customer and how many of its keys were erased."""

    customer: str
    keys: int


class CustomerStore(Protocol):
    """Customers stored through the admin API: a document per customer on the customer's own
    slot, an owner entry per API key hash (fleet-wide, claimed so that two writers racing for
    one key cannot both win), a listing index, and a feed of changes that every replica reads.

    ``lookup`` and ``get(hot=True)`` are a request's lookups, bounded by the store timeout; the
    rest is admin and background work, bounded by a longer one. All raise StoreUnavailable."""

    async def owner(self, key_hash: str) -> str | None:
        """The id of the customer an API key's hash was claimed for; one round trip."""

    async def lookup(self, key_hash: str) -> tuple[str | None, Customer | None]:
        """A request's lookup: the id an API key's hash was claimed for, and that customer if it
        is stored and not deleted (whether it lists the key is the caller's to check). One round
        trip on one server, two on a Cluster."""

    async def get(self, customer_id: str, *, hot: bool = False) -> Customer | None:
        """A stored customer that is not deleted; one round trip."""

    async def get_many(self, ids: Sequence[str], *, retired: bool = False) -> dict[str, Customer]:
        """The stored customers among ``ids``; deleted ones too when ``retired`` (billing still
        names them); one pipelined round trip."""

    async def put_many(self, customers: Sequence[Customer]) -> list[WriteResult]:
        """Store each customer, replacing a stored one with its id, each on its own: one whose key
        belongs to another customer is not written at all. Announced on the feed."""

    async def delete(self, customer_id: str, *, purge: bool) -> Deleted:
        """Delete a customer and give back its keys; with ``purge``, its keys (counters, grants,
        usage) are erased once nothing of it waits for billing (``purge_due``)."""

    async def add_key(self, customer_id: str, key_hash: str) -> WriteResult:
        """Add one API key to a stored customer (STORED, REPEATED, CONFLICT or NOT_FOUND)."""

    async def revoke_key(self, customer_id: str, key_hash: str) -> WriteResult:
        """Take one API key from a stored customer (STORED or NOT_FOUND)."""

    async def page(self, prefix: str, after: str, limit: int, plan: str | None = None) -> StoredPage:
        """Up to ``limit`` stored customers whose ids start with ``prefix``, after ``after``."""

    async def feed_position(self) -> str:
        """Where the changes feed ends now: a replica reads on from there."""

    async def changes(self, after: str, wait: float, *, check_gap: bool = False) -> FeedRead:
        """The changes after ``after``, waiting up to ``wait`` seconds for one; with
        ``check_gap`` (after a failed read), also whether some were lost meanwhile."""

    async def purge_due(self, *, wait_for_billing: bool) -> list[Purged]:
        """Run the purges that are due: a customer whose usage, outbox and void fence are empty
        (or any, without billing) has every key erased; the others are looked at again later."""


class Store(Protocol):
    def time(self) -> float:
        """The store's clock as last observed, advanced by the local clock; no I/O."""

    async def check_and_meter(self, request: MeterRequest) -> Admission:
        """Atomically check every limit and charge all of them and the usage, or nothing.

        One round trip. On REFUSED nothing in the store changed. On STALE nothing changed and
        ``store_time`` is the store's clock to recompute the calendar windows with.
        """

    async def charge(self, request: MeterRequest) -> Admission:
        """Charge response-time amounts to their limits and usage without checking; one round trip.

        ADMITTED when charged; STALE (nothing written) when a calendar window is not the store's.
        """

    async def read_limits(self, request: MeterRequest) -> Admission:
        """What each limit has used and when it resets, and each credit's balance; writes nothing."""

    async def grant(self, customer_id: str, grant: Grant) -> GrantOutcome:
        """Add prepaid credit once per grant id; one round trip."""

    async def record(self, records: Sequence[UsageRecord]) -> list[Recorded]:
        """Count usage records, each once per its key (Dedupe) and each on its own: an enforced one
        all or nothing. One round trip for them all. Never raises for the store being down: a
        record the store did not answer for is UNAVAILABLE (its customer's others too)."""

    async def replay(self, entry: JournalEntry) -> Replayed:
        """Merge one journal entry once (or undo the call a void entry names); one round trip, or
        two when the call the entry names could still run (its deadline is close)."""

    @property
    def outbox(self) -> OutboxStore:
        """The billing outboxes, on the same connections as the rest of the store."""

    @property
    def customers(self) -> CustomerStore:
        """The customers stored through the admin API, on the same connections."""

    @property
    def notifications(self) -> NotifyStore:
        """The threshold notification outboxes, on the same connections."""

    @property
    def history(self) -> HistoryStore:
        """The usage history the closed summaries leave, on the same connections."""

    @property
    def circuit_open(self) -> bool:
        """Calls fail at once because the store kept failing (store/breaker.py)."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    async def close(self) -> None: ...
