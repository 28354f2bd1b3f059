"""The ``billing:`` section: where usage summaries go, in which format, how often and how many
at once; and what the format asks of every customer (its id in the billing system)."""

from __future__ import annotations

from functools import partial
from urllib.parse import SplitResult, urlsplit

from sidecar.config.policy.draft import Draft
from sidecar.config.policy.model import DEFAULT_BILLING_INTERVAL, Billing, BillingFormat
from sidecar.config.policy.nodes import (
    At,
    read_choice,
    read_fields,
    read_int,
    read_optional,
    read_required,
    read_str,
)

_BILLING_KEYS = ("url", "format", "interval", "grace", "batch_size")


def read_billing(draft: Draft, at: At) -> None:
    mark = len(at.errors)
    fields = read_fields(at, _BILLING_KEYS, required=("url",))
    if fields is None:
        return
    url = read_required(fields, "url", _url)
    billing_format = read_optional(fields, "format", _billing_format, BillingFormat.JSON)
    interval = read_optional(fields, "interval", partial(read_int, minimum=1), DEFAULT_BILLING_INTERVAL)
    grace = read_optional(fields, "grace", read_int, 5)
    batch_size = read_optional(fields, "batch_size", partial(read_int, minimum=1), 100)
    if url is not None and len(at.errors) == mark:
        draft.billing = Billing(
            url=url, format=billing_format, interval=interval, grace=grace, batch_size=batch_size
        )
        draft.later(_billing_ids, draft, billing_format)
    most = billing_format.max_batch
    if most is not None and batch_size > most:
        fields["batch_size"].error(
            f"billing format '{billing_format.value}' accepts at most {most} events per batch, "
            f"got {batch_size}"
        )


def _billing_ids(draft: Draft, billing_format: BillingFormat) -> None:
    """Stripe and Lago address a customer by their own id: every customer must name it."""
    field_name = billing_format.customer_field
    if field_name is None:
        return
    for customer_id, entry in draft.customers.items():
        if entry.value is not None and getattr(entry.value, field_name) is None:
            entry.at.error(
                f"billing format '{billing_format.value}' needs {field_name} on every customer; "
                f"'{customer_id}' has none"
            )


def _billing_format(at: At) -> BillingFormat | None:
    return read_choice(at, BillingFormat, "format")


def _url(at: At) -> str | None:
    url = read_str(at, "a URL")
    if url is None:
        return None
    parts = _split_url(url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        at.error(f"invalid url '{url}'; expected an http:// or https:// URL")
        return None
    return url


def _split_url(url: str) -> SplitResult | None:
    try:
        return urlsplit(url)
    except ValueError:
        return None
