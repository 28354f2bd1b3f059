"""Stripe's v2 meter event stream (``billing.stripe_api: v2``): up to 100 events a JSON request,
POST /v2/billing/meter_event_stream, authorized by a short-lived session token
(https://docs.stripe.com/api/v2/billing-meter-stream; request and answer shapes from
stripe/openapi, latest/openapi.spec3.json, operations PostV2BillingMeterEventSession and
PostV2BillingMeterEventStream; the fragment used by the tests is vendored in
tests/fixtures/schemas/stripe/).

``billing.url`` is the stream endpoint (https://meter-events.stripe.com/v2/billing/meter_event_stream).
The session comes from POST /v2/billing/meter_event_session on the API host (api.stripe.com for
Stripe's meter-events host, the url's own origin for any other, a test receiver say), made with
SIDECAR_BILLING_TOKEN; billing/stripe_session.py renews it before it expires (tokens live 15
minutes). A 401 (``billing_meter_event_session_expired``) is retried with a new session.

Dedupe key: each event's ``identifier`` (unique over a rolling 24 hours), the summary id. The
stream validates events after answering 200 ``{}``: an event Stripe refuses later (a customer
unknown to it, a timestamp past 35 days) is reported in the meter's error reports
(``v1.billing.meter.error_report_triggered``), not here.

Limits: 10,000 a second in live mode (the stream's operation says requests, Stripe's changelog
events; the pacer keeps to 10,000 events); test mode and sandboxes count the stream's calls
toward the basic limit of 25 requests a second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sidecar.billing.formats.common import (
    JSON,
    BaseFormat,
    Delivery,
    Limits,
    PushRequest,
    classify_status,
    dump,
    external_ids,
    push_request,
)
from sidecar.billing.formats.stripe import TEST_MODE_PER_SECOND, test_mode
from sidecar.config.policy.model import BillingFormat, Customer
from sidecar.config.policy.windows import rfc3339
from sidecar.store.summaries import Summary

# The API version that added the v2 meter event endpoints (2024-09-30.acacia changelog); v2
# requests name their version.
STRIPE_VERSION = "2024-09-30.acacia"
SESSION_PATH = "/v2/billing/meter_event_session"
STREAM_HOST = "meter-events.stripe.com"
API_HOST = "api.stripe.com"
MAX_EVENTS = 100  # "Supports up to 100 events per request."
LIVE_EVENTS_PER_SECOND = 10_000


class StripeV2(BaseFormat):
    """Up to 100 meter events a request on the session-authorized stream."""

    kind = BillingFormat.STRIPE

    @property
    def max_batch(self) -> int | None:
        return MAX_EVENTS

    def encode(
        self, url: str, summaries: Sequence[Summary], customers: Mapping[str, Customer], token: str | None
    ) -> list[PushRequest]:
        """``token`` is the session's authentication token, not the API key."""
        stripe_ids = external_ids(summaries, customers, self.kind)
        events = [_event(summary, stripe_ids[summary.customer]) for summary in summaries]
        headers = {"Stripe-Version": STRIPE_VERSION}
        return [push_request(url, JSON, dump({"events": events}), summaries, token, extra=headers)]

    def limits(self, token: str | None) -> Limits:
        if test_mode(token):
            return Limits(requests_per_second=TEST_MODE_PER_SECOND)
        return Limits(events_per_second=LIVE_EVENTS_PER_SECOND)

    def session_url(self, url: str) -> str | None:
        """Where sessions come from: the API host for Stripe's stream host, else the same origin."""
        parts = urlsplit(url)
        netloc = API_HOST if parts.hostname == STREAM_HOST else parts.netloc
        return urlunsplit((parts.scheme, netloc, SESSION_PATH, "", ""))

    def classify(self, status: int, body: bytes, *, sent: int | None = None) -> Delivery:
        """The plain rule, plus 401 → RETRY: the session expired (the sender renews it first)."""
        return Delivery.RETRY if status == 401 else classify_status(status)


def _event(summary: Summary, stripe_customer_id: str) -> dict[str, Any]:
    """Payload values are strings (the schema's ``additionalProperties: string``), whole numbers
    only; ``timestamp`` is the window start as an RFC 3339 date-time."""
    return {
        "event_name": summary.meter,
        "identifier": summary.id,
        "timestamp": rfc3339(summary.window_start),
        "payload": {"stripe_customer_id": stripe_customer_id, "value": str(summary.value)},
    }
