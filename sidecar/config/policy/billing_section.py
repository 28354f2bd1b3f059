"""The ``billing:`` section: where usage summaries go, in which format (and Stripe API), how often
and how many at once; and what the format asks of every customer (its id in the billing system)."""

from __future__ import annotations

from functools import partial
from urllib.parse import SplitResult, urlsplit

from sidecar.config.policy.draft import Draft
from sidecar.config.policy.model import (
    DEFAULT_BILLING_INTERVAL,
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

_BILLING_KEYS = ("url", "format", "interval", "grace", "batch_size", "stripe_api")


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


def _read(fields: dict[str, At]) -> Billing:
    """Every field, its default when absent (the url empty when it is not valid)."""
    return Billing(
        url=read_required(fields, "url", _url) or "",
        format=read_optional(fields, "format", _billing_format, BillingFormat.JSON),
        interval=read_optional(fields, "interval", partial(read_int, minimum=1), DEFAULT_BILLING_INTERVAL),
        grace=read_optional(fields, "grace", read_int, 5),
        batch_size=read_optional(fields, "batch_size", partial(read_int, minimum=1), 100),
        stripe_api=read_optional(fields, "stripe_api", _stripe_api, StripeApi.V1),
    )


def _check_fit(at: At, fields: dict[str, At], billing: Billing) -> None:
    """What the format takes: stripe_api only for Stripe, and its batch size."""
    stripe = billing.format is BillingFormat.STRIPE
    if "stripe_api" in fields and not stripe:
        fields["stripe_api"].error(f"stripe_api applies to format stripe, not '{billing.format.value}'")
    most = billing.stripe_api.max_batch if stripe else billing.format.max_batch
    if most is not None and billing.batch_size > most:
        name = "stripe (v2)" if stripe else billing.format.value
        fields["batch_size"].error(
            f"billing format '{name}' accepts at most {most} events per batch, got {billing.batch_size}"
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
