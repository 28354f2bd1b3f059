"""Every Redis key the sidecar writes, built here and nowhere else.

All keys of one customer carry the hash tag ``{c:<customer>}`` so that one script call touches
one Redis Cluster slot. Customer ids cannot contain braces (the loader refuses them).
"""

from __future__ import annotations

PREFIX = "sc"


def customer_tag(customer_id: str) -> str:
    return f"{PREFIX}:{{c:{customer_id}}}"


def rate_log(customer_id: str, limit_name: str) -> str:
    """List of "<microseconds>:<amount>" entries of a moving-window limit, newest first."""
    return f"{customer_tag(customer_id)}:rl:{limit_name}"


def rate_total(customer_id: str, limit_name: str) -> str:
    """Sum of the amounts still held in the matching rate_log."""
    return f"{customer_tag(customer_id)}:rt:{limit_name}"


def quota(customer_id: str, limit_name: str, window_start: int) -> str:
    """Counter of one calendar window (day/week/month) of one limit."""
    return f"{customer_tag(customer_id)}:q:{limit_name}:{window_start}"


def usage(customer_id: str) -> str:
    """Hash of billing usage: field "<window_start>|<meter>|<feature>" → value, until pushed."""
    return f"{customer_tag(customer_id)}:u"


def credit_left(customer_id: str, meter: str) -> str:
    """Hash of prepaid grants of one meter: "<grant id>" → units left, "a:<grant id>" → granted."""
    return f"{customer_tag(customer_id)}:cr:{meter}"


def credit_expiries(customer_id: str, meter: str) -> str:
    """Sorted set of grant ids of one meter scored by expiry (unix seconds, +inf for never)."""
    return f"{customer_tag(customer_id)}:cx:{meter}"


def overdraft(customer_id: str, meter: str) -> str:
    """Units of one prepaid meter used beyond every grant; the next grant pays it off first."""
    return f"{customer_tag(customer_id)}:od:{meter}"


def grants(customer_id: str) -> str:
    """Hash grant id → the grant as JSON, kept so that a retried grant counts once."""
    return f"{customer_tag(customer_id)}:g"


def holds(customer_id: str) -> str:
    """Hash reservation id → JSON of what it holds (the steps that undo it)."""
    return f"{customer_tag(customer_id)}:h"


def hold_expiries(customer_id: str) -> str:
    """Sorted set of reservation ids scored by when (epoch ms) they are released unless settled."""
    return f"{customer_tag(customer_id)}:hx"


def call_records(customer_id: str, token: str) -> str:
    """List of the metering calls of one connection (its batcher token) that wrote, each with the
    steps that undo it, kept until their replies have been read or the journal has looked them up
    (lib.lua remember_call, which builds this name from the usage key's)."""
    return f"{customer_tag(customer_id)}:calls:{token}"


def journal_marker(customer_id: str, entry_id: str) -> str:
    """Set once a journal entry has been merged, so that a replayed entry counts once."""
    return f"{customer_tag(customer_id)}:j:{entry_id}"


def void_fence(customer_id: str) -> str:
    """Set of the voids ("<token>:<seq>") some journal fences the customer's billing windows for:
    503s whose metering call ran or may still be found to have run. close.lua leaves the
    customer's windows open while it exists, so the undo reaches the usage before any replica
    makes a summary of it. fence.lua adds a member (with a short expiry its journal renews),
    void.lua takes it out with the undo."""
    # "vh" (it was called the void hold): replicas of the release before, running beside this one
    # during a rolling upgrade, set and obey the fence under this key; a new name would let one
    # of them close a window that a void of the other is about to undo.
    return f"{customer_tag(customer_id)}:vh"


def records_seen(customer_id: str, bucket: int) -> str:
    """Set of the keys (12-byte digests of source and id) of the usage records counted in one
    bucket of events.dedupe_hours of the store's clock, kept until the next bucket ends;
    record.lua builds this name from the usage key's."""
    return f"{customer_tag(customer_id)}:rs:{bucket}"


def revisions(customer_id: str) -> str:
    """Hash "<window_start>|<meter>|<feature>" → how many times that window has been closed, as
    the release before kept it (one hash of every window, never trimmed): close.lua still reads
    it for a window closed then, and writes revision_day instead."""
    return f"{customer_tag(customer_id)}:rev"


def revision_day(customer_id: str, day_start: int) -> str:
    """The revisions of the windows of one UTC day (close.lua builds the same name from the usage
    key's): expires REVISIONS_KEPT (40 days) after the day ends."""
    return f"{customer_tag(customer_id)}:rv:{day_start}"


def first_seen(customer_id: str, meter: str, month_start: int) -> str:
    """Set of the values of a unique meter billed in one billing month (each as the first 16 hex
    digits of its SHA-1), so each is billed once a month; close.lua builds this name from the
    usage key's and expires it 7 days after the month ends."""
    return f"{customer_tag(customer_id)}:us:{meter}:{month_start}"


def outbox(customer_id: str) -> str:
    """Hash summary id → frozen summary JSON, until billing answers 2xx."""
    return f"{customer_tag(customer_id)}:ob"


def dead_letters(customer_id: str) -> str:
    """Hash summary id → {summary, reason} for summaries billing refused for good (4xx)."""
    return f"{customer_tag(customer_id)}:dl"


# -- threshold notifications (store/notifications.py; lib.lua notify_crossings) --------------------


def notify_outbox(customer_id: str) -> str:
    """Hash crossing "<type>|<name>|<window>|<threshold>" → the notification's record, until the
    receiver answers 2xx. The metering scripts build the marker and recent-list names from it."""
    return f"{customer_tag(customer_id)}:no"


def notify_marker(customer_id: str, crossing: str) -> str:
    """Set once a crossing has been recorded, so no later call records it again; it expires a day
    after its window ends (90 days for credit)."""
    return f"{customer_tag(customer_id)}:nm:{crossing}"


def notify_recent(customer_id: str) -> str:
    """List of the customer's latest notification records, newest first (notifications.RECENT_KEPT)."""
    return f"{customer_tag(customer_id)}:nr"


def notify_dead(customer_id: str) -> str:
    """Hash crossing → {record, reason} for notifications the receiver refused for good (4xx)."""
    return f"{customer_tag(customer_id)}:nd"


def history_bucket(customer_id: str, bucket_start: int, *, hourly: bool) -> str:
    """Hash "<window start - bucket start>|<window length>|<meter>|<feature>" → the value of the
    summaries closed for that window, one an hour (``hourly``: windows shorter than half an hour)
    or a day, kept history_days (close.lua builds this name from the usage key's)."""
    return f"{customer_tag(customer_id)}:{'hh' if hourly else 'hd'}:{bucket_start}"


NOTIFY_PENDING = f"{PREFIX}:notify:pending"  # customers with notifications waiting, scored by due ms
NOTIFY_DEAD = f"{PREFIX}:notify:dead"  # customers with notification dead letters
NOTIFY_PATTERN = f"{PREFIX}:{{c:*}}:no"


# Schedules shared by every replica: sorted sets of customer ids scored by when (epoch ms) each
# is due. They are indexes only; a periodic scan of the per-customer keys rebuilds them.
DIRTY = f"{PREFIX}:billing:dirty"  # customers with usage in windows not yet closed
PENDING = f"{PREFIX}:billing:pending"  # customers with summaries waiting in their outbox
DEAD = f"{PREFIX}:billing:dead"  # customers with dead letters

# -- customers stored through the admin API (store/redis/customers.py) ----------------------------
# A customer's document sits on the customer's own slot, each key hash is a key of its own, and
# the id listing is spread over INDEX_BUCKETS sorted sets: a Cluster spreads all three.
INDEX_BUCKETS = 16
KEY_OWNER_PREFIX = f"{PREFIX}:key:"
CHANGES = f"{PREFIX}:{{customers}}:changes"  # stream: one entry per change, read by every replica
PURGES = f"{PREFIX}:{{customers}}:purges"  # sorted set: customer ids to purge, scored by when (ms)


# The text around a customer id in its document's key (customer_lookup.lua builds the key from it).
CUSTOMER_AROUND = (f"{PREFIX}:{{c:", "}:cust")


def customer(customer_id: str) -> str:
    """Hash of one stored customer: p plan, a billing anchor, s/l billing ids, d when deleted (ms),
    and one field per API key, its hex SHA-256 digest → the token of the write that claimed it."""
    return f"{CUSTOMER_AROUND[0]}{customer_id}{CUSTOMER_AROUND[1]}"


def customer_purge(customer_id: str) -> str:
    """Set while a delete with purge waits to erase the customer's keys; a PUT takes it away."""
    return f"{customer_tag(customer_id)}:purge"


def customer_prefix(customer_id: str) -> str:
    """What every key of the customer starts with (the purge finds them by it)."""
    return f"{customer_tag(customer_id)}:"


def key_owner(key_hash: str) -> str:
    """String "<customer id> <claim token> <claimed at ms>": which customer an API key (its hex
    SHA-256 digest) belongs to, fleet-wide; claimed with a compare-and-set, never overwritten."""
    return f"{KEY_OWNER_PREFIX}{key_hash}"


def customer_index(bucket: int) -> str:
    """Sorted set (all scores 0, so ordered by id) of the stored customer ids of one bucket."""
    return f"{PREFIX}:{{ix:{bucket}}}:ids"


USAGE_PATTERN = f"{PREFIX}:{{c:*}}:u"
OUTBOX_PATTERN = f"{PREFIX}:{{c:*}}:ob"


def customer_of(key: str) -> str:
    """The customer id inside a per-customer key's hash tag."""
    return key[key.index("{c:") + 3 : key.index("}")]
