"""Pure encoders: usage summaries in, the HTTP requests each billing system's ingestion API takes out.

Nothing here does I/O or reads a clock. ``encode`` turns one batch of summaries into PushRequests,
and ``classify`` reads the answer to one of them. Every format uses the summary id as the
receiver's dedupe key (SPEC §6), so resending after a lost answer never bills twice:

=========  ======================  ===============================================================
format     requests per batch      dedupe key the receiver honours
=========  ======================  ===============================================================
json       one                     ``Idempotency-Key`` header, and each summary's ``id``
stripe     one per summary         ``identifier`` (and ``Idempotency-Key`` = the same summary id)
lago       one                     each event's ``transaction_id``
openmeter  one                     each CloudEvent's ``id`` (unique together with ``source``)
=========  ======================  ===============================================================

A batch is encoded in summary-id order, so the same set of summaries always yields the same body
and the same ``Idempotency-Key``. That matters to receivers (Stripe among them) that refuse a
reused key whose body differs.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlencode

from sidecar.config.policy.model import Billing, BillingFormat, Customer
from sidecar.config.policy.windows import rfc3339
from sidecar.store.summaries import Summary

SOURCE = "quota-sidecar"  # the CloudEvents `source`; OpenMeter dedupes on (id, source)
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"


@dataclass(frozen=True, slots=True)
class PushRequest:
    """One POST to the billing endpoint. A 2xx answer delivers exactly ``summary_ids``."""

    url: str
    headers: Mapping[str, str]  # Content-Type, Idempotency-Key, (Authorization when a token is given)
    body: bytes
    summary_ids: tuple[str, ...]


class Delivery(enum.Enum):
    """What the pusher does with a request after its answer: ack, back off, or dead-letter."""

    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


class UnknownCustomer(ValueError):
    """Summaries whose customer has no external billing id in the current policy.

    The loader refuses a stripe/lago customer without its id, so this means the customer was
    removed from the policy after the usage was recorded. Nothing is skipped silently: the
    pusher dead-letters ``summary_ids`` and an operator decides where that usage goes.
    """

    def __init__(self, customers: tuple[str, ...], summary_ids: tuple[str, ...], field: str) -> None:
        names = ", ".join(customers)
        super().__init__(
            f"customer(s) {names} have no {field} in the policy (removed since the usage was "
            f"recorded?): {len(summary_ids)} summary(ies) cannot be sent; add the customer back "
            f"with its {field}, or settle the dead-lettered summaries by hand"
        )
        self.customers = customers
        self.summary_ids = summary_ids


def encode(
    billing: Billing,
    summaries: Sequence[Summary],
    customers: Mapping[str, Customer],
    *,
    token: str | None = None,
) -> list[PushRequest]:
    """json/lago/openmeter: ONE request for the whole batch; stripe: one request per summary.

    Idempotency-Key: for one summary, its id; for a batch, a deterministic hash of the sorted ids
    (sha256 hex), so the same batch always gets the same key. An empty batch needs no request.
    Raises UnknownCustomer (a ValueError) when a stripe/lago summary's customer has no external id.
    """
    if not summaries:
        return []
    ordered = sorted(summaries, key=lambda summary: summary.id)
    return _ENCODERS[billing.format](billing.url, ordered, customers, token)


def idempotency_key(summary_ids: Iterable[str]) -> str:
    """One summary: its own id. Several: sha256 hex of the sorted ids, one per line (ids are hex)."""
    ids = sorted(summary_ids)
    if len(ids) == 1:
        return ids[0]
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def classify(billing_format: BillingFormat, status: int, body: bytes, *, sent: int | None = None) -> Delivery:
    """2xx → DELIVERED; 408, 425, 429 and 5xx → RETRY; other 4xx → REJECTED (dead letter). Plus:

    * lago 422 whose errors are ONLY duplicate transaction ids (``value_already_exist``) →
      DELIVERED: those events are stored already. Lago saves a batch all-or-nothing, so when
      ``sent`` (the number of events in the request) is given, the duplicates must name every
      event; a partial duplicate answer means the other events were NOT stored and resending the
      same batch fails the same way, so it is REJECTED (see ``lago_duplicates`` to split it).
    * stripe 409 → RETRY: Stripe's answer for a concurrent request with the same Idempotency-Key;
      its own SDKs retry it, and the retry replays the first request's saved answer.
    * stripe 400 is REJECTED even when it says the identifier was used before: Stripe documents
      no duplicate-event error for meter events (integrations observe ``invalid_request_error``
      "An event already exists with identifier <id>."), so only a 2xx counts as delivered. Within
      24 hours a resend carries the same Idempotency-Key and gets Stripe's saved 2xx replayed.
    """
    if 200 <= status < 300:
        return Delivery.DELIVERED
    if status in _RETRYABLE or status >= 500:
        return Delivery.RETRY
    if billing_format is BillingFormat.STRIPE and status == 409:
        return Delivery.RETRY
    if billing_format is BillingFormat.LAGO and status == 422 and _all_duplicates(body, sent):
        return Delivery.DELIVERED
    return Delivery.REJECTED


def lago_duplicates(body: bytes) -> frozenset[int]:
    """Indexes of the batch events Lago refused only because their transaction_id exists already.

    Empty unless EVERY error in the answer is a duplicate. The answer looks like
    ``{"status": 422, "error": "Unprocessable Entity", "code": "validation_errors",
    "error_details": {"0": {"transaction_id": ["value_already_exist"]}, ...}}``, keyed by the
    event's index in the batch (Lago's Events::CreateBatchService).
    """
    answer = _json_object(body)
    if answer is None or answer.get("code") != "validation_errors":
        return frozenset()
    details = answer.get("error_details")
    if not isinstance(details, dict) or not details:
        return frozenset()
    if not all(_is_index(key) and _is_duplicate_error(value) for key, value in details.items()):
        return frozenset()
    return frozenset(int(key) for key in details)


# -- the four formats --------------------------------------------------------------------------


def _encode_json(
    url: str, summaries: Sequence[Summary], customers: Mapping[str, Customer], token: str | None
) -> list[PushRequest]:
    """SPEC §6 `json`: {"summaries": [Summary.to_json(), ...]}."""
    body = _dump({"summaries": [summary.to_json() for summary in summaries]})
    return [_request(url, JSON, body, summaries, token)]


def _encode_stripe(
    url: str, summaries: Sequence[Summary], customers: Mapping[str, Customer], token: str | None
) -> list[PushRequest]:
    """One Stripe Billing meter event per summary: the endpoint takes a single event per call."""
    stripe_ids = _external_ids(summaries, customers, "stripe_customer_id")
    return [
        _request(url, FORM, _meter_event(summary, stripe_ids[summary.customer]), [summary], token)
        for summary in summaries
    ]


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


def _encode_lago(
    url: str, summaries: Sequence[Summary], customers: Mapping[str, Customer], token: str | None
) -> list[PushRequest]:
    """Lago "Batch usage events", POST /api/v1/events/batch (at most 100 events a request)
    (https://getlago.com/docs/api-reference/events/batch, fields per
    https://getlago.com/docs/guide/events/ingesting-usage).
    """
    subscriptions = _external_ids(summaries, customers, "lago_subscription_id")
    events = [_lago_event(summary, subscriptions[summary.customer]) for summary in summaries]
    return [_request(url, JSON, _dump({"events": events}), summaries, token)]


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


def _encode_openmeter(
    url: str, summaries: Sequence[Summary], customers: Mapping[str, Customer], token: str | None
) -> list[PushRequest]:
    """OpenMeter ingest: a CloudEvents 1.0 JSON batch (a JSON array), Content-Type
    application/cloudevents-batch+json, POST /api/v1/events
    (https://openmeter.io/docs/concepts/usage-events; the batch content type is the one
    openmeterio/openmeter's ingest handler and Go client accept).
    """
    body = _dump([_cloudevent(summary) for summary in summaries])
    return [_request(url, CLOUDEVENTS_BATCH, body, summaries, token)]


def _cloudevent(summary: Summary) -> dict[str, Any]:
    """``type`` matches the OpenMeter meter's eventType, ``subject`` is what it groups usage by,
    and a meter reads ``$.value`` from ``data``; ``time`` is RFC 3339."""
    return {
        "specversion": "1.0",
        "id": summary.id,
        "source": SOURCE,
        "type": summary.meter,
        "subject": summary.customer,
        "time": rfc3339(summary.window_start),
        "data": {
            "value": summary.value,
            "feature": summary.feature,
            "plan": summary.plan,
            "window_end": rfc3339(summary.window_end),
        },
    }


_Encoder = Callable[[str, Sequence[Summary], Mapping[str, Customer], str | None], list[PushRequest]]

_ENCODERS: Mapping[BillingFormat, _Encoder] = MappingProxyType(
    {
        BillingFormat.JSON: _encode_json,
        BillingFormat.STRIPE: _encode_stripe,
        BillingFormat.LAGO: _encode_lago,
        BillingFormat.OPENMETER: _encode_openmeter,
    }
)

_RETRYABLE = frozenset({408, 425, 429})


# -- helpers -----------------------------------------------------------------------------------


def _request(
    url: str, content_type: str, body: bytes, summaries: Sequence[Summary], token: str | None
) -> PushRequest:
    ids = tuple(summary.id for summary in summaries)
    headers = {"Content-Type": content_type, "Idempotency-Key": idempotency_key(ids)}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return PushRequest(url, MappingProxyType(headers), body, ids)


def _external_ids(
    summaries: Sequence[Summary], customers: Mapping[str, Customer], field: str
) -> dict[str, str]:
    """customer → its id in the billing system, or UnknownCustomer naming every one missing."""
    found: dict[str, str] = {}
    for name in {summary.customer for summary in summaries}:
        customer = customers.get(name)
        external: str | None = getattr(customer, field) if customer is not None else None
        if external:
            found[name] = external
    missing = [summary for summary in summaries if summary.customer not in found]
    if missing:
        names = tuple(sorted({summary.customer for summary in missing}))
        raise UnknownCustomer(names, tuple(summary.id for summary in missing), field)
    return found


def _dump(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(body)
    except ValueError:  # also UnicodeDecodeError
        return None
    return answer if isinstance(answer, dict) else None


def _is_index(key: str) -> bool:
    return key.isascii() and key.isdigit()


def _is_duplicate_error(errors: object) -> bool:
    if not isinstance(errors, dict) or set(errors) != {"transaction_id"}:
        return False
    codes = errors["transaction_id"]
    return isinstance(codes, list) and bool(codes) and all(code == "value_already_exist" for code in codes)


def _all_duplicates(body: bytes, sent: int | None) -> bool:
    duplicates = lago_duplicates(body)
    if not duplicates:
        return False
    return sent is None or duplicates == frozenset(range(sent))
