"""Lago "Batch usage events", POST /api/v1/events/batch (at most 100 events a request)
(https://getlago.com/docs/api-reference/events/batch, fields per
https://getlago.com/docs/guide/events/ingesting-usage).

Dedupe key: each event's ``transaction_id``. The customer is its ``lago_subscription_id``. Lago
saves a batch all-or-nothing and names the events it already has, so a partly duplicate answer
splits: those events are delivered, the rest are sent again without them.

Limits (https://getlago.com/docs/api-reference/rate-limits): event ingestion takes 500 requests a
second per organization by default; a 429 carries ``X-RateLimit-Reset`` (seconds until the
window resets), which the sender waits out like a Retry-After.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sidecar.billing.formats.common import (
    JSON,
    BaseFormat,
    Delivery,
    Limits,
    PushRequest,
    classify_status,
    dump,
    external_ids,
    json_object,
    push_request,
)
from sidecar.config.policy.model import BillingFormat, Customer
from sidecar.config.policy.windows import rfc3339
from sidecar.store.summaries import Summary


class Lago(BaseFormat):
    """One events batch a request."""

    kind = BillingFormat.LAGO

    def encode(
        self, url: str, summaries: Sequence[Summary], customers: Mapping[str, Customer], token: str | None
    ) -> list[PushRequest]:
        subscriptions = external_ids(summaries, customers, self.kind)
        events = [_lago_event(summary, subscriptions[summary.customer]) for summary in summaries]
        return [push_request(url, JSON, dump({"events": events}), summaries, token)]

    def limits(self, token: str | None) -> Limits:
        return Limits(requests_per_second=500)

    def classify(self, status: int, body: bytes, *, sent: int | None = None) -> Delivery:
        """The plain rule, plus a 422 whose errors are ONLY duplicate transaction ids
        (``value_already_exist``) → DELIVERED: those events are stored already. When ``sent`` (the
        number of events in the request) is given, the duplicates must name every event; a
        partial duplicate answer means the other events were NOT stored and resending the same
        batch fails the same way, so it is REJECTED (``already_stored`` splits it)."""
        if status == 422 and _covers(self.already_stored(body), sent):
            return Delivery.DELIVERED
        return classify_status(status)

    def already_stored(self, body: bytes) -> frozenset[int]:
        """Indexes of the batch events Lago refused only because their transaction_id exists already.

        Empty unless EVERY error in the answer is a duplicate. The answer looks like
        ``{"status": 422, "error": "Unprocessable Entity", "code": "validation_errors",
        "error_details": {"0": {"transaction_id": ["value_already_exist"]}, ...}}``, keyed by the
        event's index in the batch (Lago's Events::CreateBatchService).
        """
        answer = json_object(body)
        if answer is None or answer.get("code") != "validation_errors":
            return frozenset()
        details = answer.get("error_details")
        if not isinstance(details, dict) or not details:
            return frozenset()
        if not all(_is_index(key) and _is_duplicate_error(value) for key, value in details.items()):
            return frozenset()
        return frozenset(int(key) for key in details)


def _lago_event(summary: Summary, external_subscription_id: str) -> dict[str, Any]:
    """``timestamp`` is unix seconds (Lago's "UNIX timestamp of the event"). Lago aggregates one
    named property (the billable metric's field_name); ours is ``value``, so a Lago metric for a
    sidecar meter is SUM (or MAX) over ``value``, whatever our own aggregation was."""
    return {
        "transaction_id": summary.id,
        "external_subscription_id": external_subscription_id,
        "code": summary.meter,
        "timestamp": summary.window_start,
        "properties": {
            "value": summary.value,
            "feature": summary.feature,
            "window_end": rfc3339(summary.window_end),
        },
    }


def _is_index(key: str) -> bool:
    return key.isascii() and key.isdigit()


def _is_duplicate_error(errors: object) -> bool:
    if not isinstance(errors, dict) or set(errors) != {"transaction_id"}:
        return False
    codes = errors["transaction_id"]
    return isinstance(codes, list) and bool(codes) and all(code == "value_already_exist" for code in codes)


def _covers(duplicates: frozenset[int], sent: int | None) -> bool:
    if not duplicates:
        return False
    return sent is None or duplicates == frozenset(range(sent))
