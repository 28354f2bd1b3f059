"""What every billing format shares: the request it builds, the answer's meaning, the status rule.

The format modules import only this module (never the package's ``__init__``, which imports them
for the registry), so the package has no import cycle.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from sidecar.config.policy.model import BillingFormat, Customer
from sidecar.store.summaries import Summary

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"
_RETRYABLE = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class PushRequest:
    """One POST to the billing endpoint. A 2xx answer delivers exactly ``summary_ids``.

    Requests of one ``lane`` are sent one after another, never side by side: Stripe's v1 meter
    events take one concurrent call per customer and meter. None: no such rule.
    """

    url: str
    headers: Mapping[str, str]  # Content-Type, Idempotency-Key, (Authorization when a token is given)
    body: bytes
    summary_ids: tuple[str, ...]
    lane: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What a billing system documents it takes from one account, which the sender keeps to.

    ``in_flight``: requests at once (the pusher's own bound, enough to cover a 100 ms round trip
    at the rate allowed). ``requests_per_second`` / ``events_per_second``: at most that many
    begun in any one second (None: no documented limit; a 429 and its Retry-After still pace
    the sender). The limits hold per replica: replicas sharing one account share its limit, and
    the 429s past it are retried after their Retry-After.
    """

    in_flight: int = 16
    requests_per_second: float | None = None
    events_per_second: float | None = None


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


def idempotency_key(summary_ids: Iterable[str]) -> str:
    """One summary: its own id. Several: sha256 hex of the sorted ids, one per line (ids are hex)."""
    ids = sorted(summary_ids)
    if len(ids) == 1:
        return ids[0]
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def classify_status(status: int) -> Delivery:
    """The rule every format starts from: 2xx → DELIVERED; 408, 425, 429 and 5xx → RETRY (the
    receiver may take it later); any other answer, a redirect included → REJECTED (dead letter)."""
    if 200 <= status < 300:
        return Delivery.DELIVERED
    if status in _RETRYABLE or status >= 500:
        return Delivery.RETRY
    return Delivery.REJECTED


def push_request(
    url: str,
    content_type: str,
    body: bytes,
    summaries: Sequence[Summary],
    token: str | None,
    *,
    lane: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> PushRequest:
    """The request for ``summaries``, keyed by their ids, its headers (and ``extra`` ones) frozen."""
    ids = tuple(summary.id for summary in summaries)
    headers = {"Content-Type": content_type, "Idempotency-Key": idempotency_key(ids), **(extra or {})}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return PushRequest(url, MappingProxyType(headers), body, ids, lane)


def external_ids(
    summaries: Sequence[Summary], customers: Mapping[str, Customer], kind: BillingFormat
) -> dict[str, str]:
    """customer → its id in the billing system (``kind.customer_field``; our own id when the
    format names none), or UnknownCustomer naming every customer missing one."""
    field = kind.customer_field
    if field is None:
        return {summary.customer: summary.customer for summary in summaries}
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


def dump(document: object) -> bytes:
    """Compact UTF-8 JSON, the bytes every JSON format sends."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_object(body: bytes) -> dict[str, Any] | None:
    """A receiver's answer as a JSON object, or None when it is anything else."""
    try:
        answer = json.loads(body)
    except ValueError:  # also UnicodeDecodeError
        return None
    return answer if isinstance(answer, dict) else None


class BaseFormat:
    """What a format that is not special shares: its traits read from its ``kind`` (config's
    BillingFormat, the one place they are written), the plain status rule, and no partial
    rejections. A format module subclasses it, sets ``kind``, writes ``encode`` and overrides
    what its billing system answers differently."""

    kind: BillingFormat

    @property
    def customer_field(self) -> str | None:
        return self.kind.customer_field

    @property
    def max_batch(self) -> int | None:
        return self.kind.max_batch

    def limits(self, token: str | None) -> Limits:
        return Limits()

    def session_url(self, url: str) -> str | None:
        return None

    def classify(self, status: int, body: bytes, *, sent: int | None = None) -> Delivery:
        return classify_status(status)

    def already_stored(self, body: bytes) -> frozenset[int]:
        return frozenset()
