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

from sidecar.config.policy.model import Customer
from sidecar.config.policy.notifications import DEFAULT_HISTORY_DAYS
from sidecar.errors import UnansweredCall
from sidecar.store.history import HistoryStore
from sidecar.store.notifications import NotifyStore
from sidecar.store.summaries import DEFAULT_NAMESPACE, Summary
from sidecar.store.values import (
    Admission,
    CreditCharge,
    CreditState,
    Dedupe,
    Grant,
    GrantOutcome,
    Hold,
    JournalEntry,
    LimitCharge,
    LimitState,
    MeterRequest,
    Outcome,
    Recorded,
    RecordOutcome,
    Replayed,
    ScriptEntry,
    UsageCharge,
    UsageEntry,
    UsageRecord,
    VoidEntry,
)

__all__ = [
    "Admission",
    "CreditCharge",
    "CreditState",
    "Dedupe",
    "Grant",
    "GrantOutcome",
    "Hold",
    "JournalEntry",
    "LimitCharge",
    "LimitState",
    "MeterRequest",
    "Outcome",
    "RecordOutcome",
    "Recorded",
    "Replayed",
    "ScriptEntry",
    "UsageCharge",
    "UsageEntry",
    "UsageRecord",
    "VoidEntry",
]

FENCED = -1  # OutboxStore.close moved nothing: a void fence keeps the customer's windows open


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

    async def lookup_file_key(
        self, key_hash: str, file_id: str
    ) -> tuple[str | None, Customer | None, Customer | None]:
        """``lookup`` of a key that a policy file gives to ``file_id``, and the stored customer
        with that id (which replaces the file's, keys included): a request's lookup of a file
        customer, in one round trip on one server (two on a Cluster) instead of two in a row."""

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
