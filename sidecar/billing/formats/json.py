"""SPEC §6 ``json``: one request a batch, ``{"summaries": [Summary.to_json(), ...]}``.

Dedupe key: the ``Idempotency-Key`` header, and each summary's ``id``. The customer is ours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sidecar.billing.formats.common import JSON, BaseFormat, PushRequest, dump, push_request
from sidecar.config.policy.model import BillingFormat, Customer
from sidecar.store.summaries import Summary


class Json(BaseFormat):
    """Our own format: every Summary field, times in RFC 3339."""

    kind = BillingFormat.JSON

    def encode(
        self, url: str, summaries: Sequence[Summary], customers: Mapping[str, Customer], token: str | None
    ) -> list[PushRequest]:
        body = dump({"summaries": [summary.to_json() for summary in summaries]})
        return [push_request(url, JSON, body, summaries, token)]
