"""OpenMeter ingest: a CloudEvents 1.0 JSON batch (a JSON array), Content-Type
application/cloudevents-batch+json, POST /api/v1/events
(https://openmeter.io/docs/concepts/usage-events; the batch content type is the one
openmeterio/openmeter's ingest handler and Go client accept).

Dedupe key: each CloudEvent's ``id`` (unique together with ``source``, the summary's
``billing.namespace``, frozen with it when its window closed, so a resend after the namespace
changed still dedupes). The customer is ours, as the event's ``subject``.

Limits (https://openmeter.io/docs/cloud/api/rate-limiting): ingestion is limited per plan, not
published; a 429 carries Retry-After, which the sender keeps to. No batch limit is documented:
``billing.batch_size`` (100 by default) events a request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sidecar.billing.formats.common import CLOUDEVENTS_BATCH, BaseFormat, PushRequest, dump, push_request
from sidecar.config.policy.model import BillingFormat, Customer
from sidecar.config.policy.windows import rfc3339
from sidecar.store.summaries import Summary


class OpenMeter(BaseFormat):
    """One CloudEvents batch a request."""

    kind = BillingFormat.OPENMETER

    def encode(
        self, url: str, summaries: Sequence[Summary], customers: Mapping[str, Customer], token: str | None
    ) -> list[PushRequest]:
        body = dump([_cloudevent(summary) for summary in summaries])
        return [push_request(url, CLOUDEVENTS_BATCH, body, summaries, token)]


def _cloudevent(summary: Summary) -> dict[str, Any]:
    """``type`` matches the OpenMeter meter's eventType, ``subject`` is what it groups usage by,
    and a meter reads ``$.value`` from ``data``; ``time`` is RFC 3339."""
    return {
        "specversion": "1.0",
        "id": summary.id,
        "source": summary.namespace,  # OpenMeter dedupes on (id, source)
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
