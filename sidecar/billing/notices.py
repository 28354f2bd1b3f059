"""A notification on the wire (SPEC §9): its document, and the request that carries it.

One notification a request, so a receiver deduplicates on the one id (also sent as
``Idempotency-Key``) and answers for that one alone:

- ``json``: ``Content-Type: application/json``, the document itself;
- ``cloudevents``: ``Content-Type: application/cloudevents+json``, a CloudEvents 1.0 structured
  event: ``id`` the notification's id, ``source`` billing.namespace, ``type`` the notification's
  type, ``subject`` the customer, ``time`` when it crossed, ``data`` the document.

Both are signed like billing pushes (``Sidecar-Signature``, billing/signing.py) when
SIDECAR_BILLING_SECRET is set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sidecar.billing.signing import HEADER as SIGNATURE_HEADER
from sidecar.billing.signing import signature
from sidecar.config.policy.notifications import NotifyFormat
from sidecar.config.policy.windows import rfc3339
from sidecar.store.notifications import LIMIT_THRESHOLD, Notification

CONTENT_TYPES = {
    NotifyFormat.JSON: "application/json",
    NotifyFormat.CLOUDEVENTS: "application/cloudevents+json",
}


@dataclass(frozen=True, slots=True)
class NoticeRequest:
    """One POST: its body and headers, ready to send."""

    body: bytes
    headers: dict[str, str]


def document(notice: Notification, namespace: str) -> dict[str, Any]:
    """What crossed, for whom, in which window: the ``json`` body and the CloudEvents ``data``."""
    meter, period, feature = _limit_parts(notice)
    return {
        "id": notice.id(namespace),
        "type": notice.type,
        "customer": notice.customer,
        "plan": notice.plan,
        "limit_name": notice.name if notice.type == LIMIT_THRESHOLD else f"{notice.name}-prepaid",
        "meter": meter,
        "period": period,
        "feature": feature,
        "window_start": None if notice.window_start is None else rfc3339(notice.window_start),
        "window_end": None if notice.window_end is None else rfc3339(notice.window_end),
        "threshold": notice.threshold,
        "used": notice.used,
        "limit": notice.limit,
        "at": rfc3339(notice.at),
    }


def _limit_parts(notice: Notification) -> tuple[str, str, str | None]:
    """(meter, period, feature) of a limit's name "<meter>-<period>[-<feature>]" (meter and
    feature names have no hyphen: the loader's names are [a-z][a-z0-9_]*); credit is "prepaid"."""
    if notice.type != LIMIT_THRESHOLD:
        return notice.name, "prepaid", None
    meter, period, *feature = notice.name.split("-", 2)
    return meter, period, feature[0] if feature else None


def cloudevent(notice: Notification, namespace: str) -> dict[str, Any]:
    data = document(notice, namespace)
    return {
        "specversion": "1.0",
        "id": data["id"],
        "source": namespace,
        "type": notice.type,
        "subject": notice.customer,
        "time": data["at"],
        "datacontenttype": "application/json",
        "data": data,
    }


def notice_request(
    notice: Notification, notify_format: NotifyFormat, namespace: str, *, secret: str | None, now: int
) -> NoticeRequest:
    """The POST for one notification, signed at ``now`` (unix seconds) when a secret is set."""
    body = (
        cloudevent(notice, namespace)
        if notify_format is NotifyFormat.CLOUDEVENTS
        else document(notice, namespace)
    )
    encoded = json.dumps(body, separators=(",", ":")).encode()
    headers = {"Content-Type": CONTENT_TYPES[notify_format], "Idempotency-Key": notice.id(namespace)}
    if secret:
        headers[SIGNATURE_HEADER] = signature(secret, encoded, now)
    return NoticeRequest(encoded, headers)
