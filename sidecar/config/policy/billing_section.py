"""The ``billing:`` section: where usage summaries go, in which format, how often and how many
at once, under which namespace; what the format asks of every customer (its id in the billing
system); and what the billing system would refuse later (SPEC §6): a window that cannot reach
Stripe within the 35 days it takes events for, a meter whose aggregation the system cannot bill."""

from __future__ import annotations

import re
from functools import partial
from urllib.parse import SplitResult, urlsplit

from sidecar.config.policy.draft import Draft
from sidecar.config.policy.model import (
    DEFAULT_BILLING_INTERVAL,
    DEFAULT_NAMESPACE,
    Billing,
    BillingFormat,
    StripeApi,
)
from sidecar.config.policy.nodes import (
    At,
    read_choice,
    read_fields,
    read_int,
    read_optional,
    read_required,
    read_str,
)

_BILLING_KEYS = ("url", "format", "interval", "grace", "batch_size", "stripe_api", "namespace")
# A URI reference fit for a CloudEvents source, and no "|" (the summary id's separator).
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:/@+-]{0,99}")
_DAY = 86400


def read_billing(draft: Draft, at: At) -> None:
    mark = len(at.errors)
    fields = read_fields(at, _BILLING_KEYS, required=("url",))
    if fields is None:
        return
    billing = _read(fields)
    _check_fit(at, fields, billing)
    if billing.url and len(at.errors) == mark:
        draft.billing = billing
        draft.later(_billing_ids, draft, billing.format)
    draft.later(_billable_meters, draft, billing.format)


def _read(fields: dict[str, At]) -> Billing:
    """Every field, its default when absent (the url empty when it is not valid)."""
    return Billing(
        url=read_required(fields, "url", _url) or "",
        format=read_optional(fields, "format", _billing_format, BillingFormat.JSON),
        interval=read_optional(fields, "interval", partial(read_int, minimum=1), DEFAULT_BILLING_INTERVAL),
        grace=read_optional(fields, "grace", read_int, 5),
        batch_size=read_optional(fields, "batch_size", partial(read_int, minimum=1), 100),
        stripe_api=read_optional(fields, "stripe_api", _stripe_api, StripeApi.V1),
        namespace=read_optional(fields, "namespace", _namespace, DEFAULT_NAMESPACE),
    )


def _check_fit(at: At, fields: dict[str, At], billing: Billing) -> None:
    """What the format takes: stripe_api only for Stripe, its batch size, its events' age."""
    stripe = billing.format is BillingFormat.STRIPE
    if "stripe_api" in fields and not stripe:
        fields["stripe_api"].error(f"stripe_api applies to format stripe, not '{billing.format.value}'")
    most = billing.stripe_api.max_batch if stripe else billing.format.max_batch
    if most is not None and billing.batch_size > most:
        name = "stripe (v2)" if stripe else billing.format.value
        fields["batch_size"].error(
            f"billing format '{name}' accepts at most {most} events per batch, got {billing.batch_size}"
        )
    _window_arrives(at, fields, billing.format, billing.interval + billing.grace)


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


def _window_arrives(at: At, fields: dict[str, At], billing_format: BillingFormat, delay: int) -> None:
    """A summary is sent `interval + grace` seconds after its window starts, which is its event's
    timestamp: a system that takes events only so old (Stripe: 35 days) would refuse every one."""
    most = billing_format.max_event_age
    if most is None or delay < most:
        return
    where = fields.get("interval") or fields.get("grace") or at
    where.error(
        f"billing format '{billing_format.value}' takes events at most {most // _DAY} days old, and a "
        f"summary is sent interval + grace = {delay} seconds ({delay / _DAY:.1f} days) after its "
        f"window starts; make interval + grace less than {most} seconds"
    )


def _billable_meters(draft: Draft, billing_format: BillingFormat) -> None:
    """A meter whose aggregation the system cannot bill from per-window summaries (Stripe: max
    and min, the largest of a month's windows is not their sum; Lago: min) is refused."""
    for name, entry in draft.meters.items():
        meter = entry.value
        if meter is None or meter.aggregation.value not in billing_format.unbillable:
            continue
        able = [f.value for f in BillingFormat if meter.aggregation.value not in f.unbillable]
        entry.at.error(
            f"meter '{name}' aggregates {meter.aggregation.value}, which billing format "
            f"'{billing_format.value}' cannot bill ({billing_format.unbillable_why}); bill it with "
            f"format {', '.join(able)}, or aggregate sum"
        )


def _namespace(at: At) -> str | None:
    text = read_str(at, "a namespace")
    if text is not None and not _NAMESPACE.fullmatch(text):
        at.error(
            f"invalid namespace '{text}'; use a letter or digit, then letters, digits or . _ ~ : / @ + - "
            "(at most 100 characters: it is the CloudEvents source)"
        )
        return None
    return text


def _billing_format(at: At) -> BillingFormat | None:
    return read_choice(at, BillingFormat, "format")


def _stripe_api(at: At) -> StripeApi | None:
    return read_choice(at, StripeApi, "stripe_api")


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
