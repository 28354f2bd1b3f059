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


def revisions(customer_id: str) -> str:
    """Hash "<window_start>|<meter>|<feature>" → how many times that window has been closed."""
    return f"{customer_tag(customer_id)}:rev"


def outbox(customer_id: str) -> str:
    """Hash summary id → frozen summary JSON, until billing answers 2xx."""
    return f"{customer_tag(customer_id)}:ob"


def dead_letters(customer_id: str) -> str:
    """Hash summary id → {summary, reason} for summaries billing refused for good (4xx)."""
    return f"{customer_tag(customer_id)}:dl"


# Schedules shared by every replica: sorted sets of customer ids scored by when (epoch ms) each
# is due. They are indexes only; a periodic scan of the per-customer keys rebuilds them.
DIRTY = f"{PREFIX}:billing:dirty"  # customers with usage in windows not yet closed
PENDING = f"{PREFIX}:billing:pending"  # customers with summaries waiting in their outbox
DEAD = f"{PREFIX}:billing:dead"  # customers with dead letters

# Customers stored through the admin API: id → JSON, and a version bumped on every change.
CUSTOMERS = f"{PREFIX}:{{customers}}:all"
CUSTOMERS_VERSION = f"{PREFIX}:{{customers}}:version"
USAGE_PATTERN = f"{PREFIX}:{{c:*}}:u"
OUTBOX_PATTERN = f"{PREFIX}:{{c:*}}:ob"


def customer_of(key: str) -> str:
    """The customer id inside a per-customer key's hash tag."""
    return key[key.index("{c:") + 3 : key.index("}")]
