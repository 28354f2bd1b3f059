"""Billing formats: usage summaries in, the HTTP requests each billing system's ingestion API takes out.

Nothing here does I/O or reads a clock. ``encode`` turns one batch of summaries into PushRequests,
and a Format's ``classify`` reads the answer to one of them. Every format uses the summary id as
the receiver's dedupe key (SPEC §6), so resending after a lost answer never bills twice:

==========  ======================  ==============================================================
format      requests per batch      dedupe key the receiver honours
==========  ======================  ==============================================================
json        one                     ``Idempotency-Key`` header, and each summary's ``id``
stripe      one per summary         ``identifier`` (and ``Idempotency-Key`` = the same summary id)
stripe, v2  one (up to 100)         each event's ``identifier``
lago        one (up to 100)         each event's ``transaction_id``
openmeter   one                     each CloudEvent's ``id`` (unique together with ``source``)
==========  ======================  ==============================================================

Each format also says what its system takes (``limits``: requests at once, requests or events a
second), which billing/sender.py keeps to, and whether its requests need a session token first
(``session_url``: Stripe's v2 stream).

A batch is encoded in summary-id order, so the same set of summaries always yields the same body
and the same ``Idempotency-Key``. That matters to receivers (Stripe among them) that refuse a
reused key whose body differs.

A new format is a BillingFormat member in config (with its customer field and batch limit), one
module here implementing ``Format``, and one line in ``FORMATS``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Protocol

from sidecar.billing.formats.common import Delivery, Limits, PushRequest, UnknownCustomer, idempotency_key
from sidecar.billing.formats.json import Json
from sidecar.billing.formats.lago import Lago
from sidecar.billing.formats.openmeter import OpenMeter
from sidecar.billing.formats.stripe import Stripe
from sidecar.billing.formats.stripe_v2 import StripeV2
from sidecar.config.policy.model import Billing, BillingFormat, Customer, StripeApi
from sidecar.store.summaries import Summary

__all__ = [
    "FORMATS",
    "STRIPE_APIS",
    "Delivery",
    "Format",
    "Limits",
    "PushRequest",
    "UnknownCustomer",
    "encode",
    "format_for",
    "idempotency_key",
]


class Format(Protocol):
    """One billing system's wire format: what a request looks like and what its answers mean."""

    @property
    def kind(self) -> BillingFormat:
        """The policy's name for it; its key in FORMATS."""

    @property
    def customer_field(self) -> str | None:
        """The Customer field that names a customer in this billing system (every customer must
        fill it, and a summary whose customer left the policy cannot be sent); None: our own id."""

    @property
    def max_batch(self) -> int | None:
        """The most summaries one request may carry (the loader refuses a larger batch_size)."""

    def encode(
        self, url: str, summaries: Sequence[Summary], customers: Mapping[str, Customer], token: str | None
    ) -> list[PushRequest]:
        """The requests that deliver ``summaries`` (at least one, in id order), each with a
        deterministic Idempotency-Key and, when ``token`` is given, a Bearer Authorization.
        Raises UnknownCustomer when a customer has no ``customer_field``."""

    def limits(self, token: str | None) -> Limits:
        """What the system takes from one account (its documented rate limits, which may depend
        on the key: Stripe's test mode), and how many requests to keep in flight."""

    def session_url(self, url: str) -> str | None:
        """Where a session token for ``url`` comes from, when requests carry one instead of the
        API key (Stripe's v2 stream); None: the API key authorizes each request."""

    def classify(self, status: int, body: bytes, *, sent: int | None = None) -> Delivery:
        """What an answer means for every summary of the request: DELIVERED (ack), RETRY (back
        off) or REJECTED (dead letter). ``sent`` is the number of summaries in the request."""

    def already_stored(self, body: bytes) -> frozenset[int]:
        """The split of a partial rejection: indexes (in the request) of the summaries a REJECTED
        answer says the receiver has already. They count as delivered and the rest are retried
        without them; empty when the answer says nothing of the kind."""


FORMATS: Mapping[BillingFormat, Format] = MappingProxyType(
    {
        BillingFormat.JSON: Json(),
        BillingFormat.STRIPE: Stripe(),
        BillingFormat.LAGO: Lago(),
        BillingFormat.OPENMETER: OpenMeter(),
    }
)


# The Stripe APIs ``billing.stripe_api`` chooses between; FORMATS holds v1.
STRIPE_APIS: Mapping[StripeApi, Format] = MappingProxyType(
    {StripeApi.V1: FORMATS[BillingFormat.STRIPE], StripeApi.V2: StripeV2()}
)


def format_for(billing: Billing) -> Format:
    """The format a policy's billing section names (``stripe_api`` matters for Stripe only)."""
    if billing.format is BillingFormat.STRIPE:
        return STRIPE_APIS[billing.stripe_api]
    return FORMATS[billing.format]


def encode(
    billing: Billing,
    summaries: Sequence[Summary],
    customers: Mapping[str, Customer],
    *,
    token: str | None = None,
) -> list[PushRequest]:
    """json/lago/openmeter/stripe v2: ONE request for the whole batch; stripe v1: one request per
    summary.

    Idempotency-Key: for one summary, its id; for a batch, a deterministic hash of the sorted ids
    (sha256 hex), so the same batch always gets the same key. An empty batch needs no request.
    Raises UnknownCustomer (a ValueError) when a stripe/lago summary's customer has no external id.
    """
    if not summaries:
        return []
    ordered = sorted(summaries, key=lambda summary: summary.id)
    return format_for(billing).encode(billing.url, ordered, customers, token)
