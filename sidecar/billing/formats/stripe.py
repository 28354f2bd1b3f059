"""Stripe Billing meter events, POST /v1/billing/meter_events: one form-encoded event a request.

Dedupe key: ``identifier`` (and ``Idempotency-Key`` = the same summary id). The customer is its
``stripe_customer_id``.

Limits (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api, "Rate
limits"; https://docs.stripe.com/rate-limits): 1,000 calls a second per account in live mode,
and one concurrent call per customer per meter (each request's ``lane``); in test mode and
sandboxes the calls count toward the basic limit of 25 a second. A test-mode key (``sk_test_``,
``rk_test_``) is paced at 25. More than 1,000 a second: ``billing.stripe_api: v2``
(stripe_v2.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import urlencode

from sidecar.billing.formats.common import (
    FORM,
    BaseFormat,
    Delivery,
    Limits,
    PushRequest,
    classify_status,
    external_ids,
    push_request,
)
from sidecar.config.policy.model import BillingFormat, Customer
from sidecar.store.summaries import Summary


class Stripe(BaseFormat):
    """One meter event per summary: the endpoint takes a single event per call."""

    kind = BillingFormat.STRIPE

    def encode(
        self, url: str, summaries: Sequence[Summary], customers: Mapping[str, Customer], token: str | None
    ) -> list[PushRequest]:
        stripe_ids = external_ids(summaries, customers, self.kind)
        return [_request(url, summary, stripe_ids[summary.customer], token) for summary in summaries]

    def limits(self, token: str | None) -> Limits:
        """128 at once covers 1,000 a second at up to 128 ms a call; the rate is the real bound."""
        return Limits(in_flight=128, requests_per_second=TEST_MODE_PER_SECOND if test_mode(token) else 1000)

    def classify(self, status: int, body: bytes, *, sent: int | None = None) -> Delivery:
        """The plain rule, plus 409 → RETRY: Stripe's answer for a concurrent request with the same
        Idempotency-Key; its own SDKs retry it, and the retry replays the first request's saved
        answer.

        A 400 is REJECTED even when it says the identifier was used before: Stripe documents no
        duplicate-event error for meter events (integrations observe ``invalid_request_error``
        "An event already exists with identifier <id>."), so only a 2xx counts as delivered.
        Within 24 hours a resend carries the same Idempotency-Key and gets Stripe's saved 2xx
        replayed.
        """
        return Delivery.RETRY if status == 409 else classify_status(status)


TEST_MODE_PER_SECOND = 25  # the basic limit meter events count toward outside live mode


def test_mode(token: str | None) -> bool:
    """A test-mode or sandbox secret or restricted key; no token: paced as live mode."""
    return token is not None and token.startswith(("sk_test_", "rk_test_"))


def _request(url: str, summary: Summary, stripe_customer_id: str, token: str | None) -> PushRequest:
    """One event, in the lane of its Stripe customer and meter."""
    body = _meter_event(summary, stripe_customer_id)
    lane = f"{stripe_customer_id}|{summary.meter}"
    return push_request(url, FORM, body, [summary], token, lane=lane)


def _meter_event(summary: Summary, stripe_customer_id: str) -> bytes:
    """Form fields of "Create a billing meter event", POST /v1/billing/meter_events
    (https://docs.stripe.com/api/billing/meter-event/create and
    https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api).

    ``payload`` keys are the meter's defaults (customer_mapping.event_payload_key
    ``stripe_customer_id``, value_settings.event_payload_key ``value``); Stripe takes payload
    values as strings and whole numbers only. ``identifier`` is Stripe's dedupe key (unique over
    a rolling period of at least 24 hours). ``timestamp`` is the window start in unix seconds:
    Stripe requires it within the past 35 calendar days and at most 5 minutes in the future,
    which a window start satisfies for live pushes. A summary held back past that by a long
    outage is refused by Stripe, with a 400 (dead-lettered here) or later in its asynchronous
    meter error report, so the operator must settle it by hand.
    """
    return urlencode(
        [
            ("event_name", summary.meter),
            ("payload[stripe_customer_id]", stripe_customer_id),
            ("payload[value]", str(summary.value)),
            ("identifier", summary.id),
            ("timestamp", str(summary.window_start)),
        ]
    ).encode("ascii")
