"""The values the store port trades in: what a request charges, what the store answered, what
a usage record, a grant and a journal entry are. Plain frozen data, nothing that talks to Redis;
the protocols that take and return them are in port.py, which re-exports every name here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sidecar.config.policy.model import Limit
from sidecar.config.policy.windows import Window
from sidecar.errors import UnansweredCall


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
