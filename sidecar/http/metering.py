"""Response-time metering: tally an exchange while it streams, then charge what it measured.

The tally counts request and response bytes as they pass and, only when a meter reads a JSON
path, keeps up to measure.JSON_CAPTURE_LIMIT bytes of a JSON response. When the response ends
(completely, or cut off by either side) the measured meters are read and charged in one store
round trip, to their limits and to the billing summary of the window the store's clock is in.
A value that cannot be read charges nothing and is counted in sidecar_unmeasured_total.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from sidecar.admission.gate import at_store_time
from sidecar.admission.plan import response_request
from sidecar.admission.sources import JSON_CAPTURE_LIMIT, Exchange, measure, measure_text
from sidecar.admission.verdict import Verdict
from sidecar.config.policy.model import Aggregation, ChargeSpec, Policy
from sidecar.errors import StoreUnavailable
from sidecar.http.components import Components
from sidecar.ledger.journal import keep_in_journal

log = logging.getLogger("sidecar.http.metering")


def reads_json(spec: ChargeSpec | None) -> bool:
    """A measured meter reads a JSON body (the response's), which the tally must then capture."""
    return spec is not None and any(m.source.traits.body for m in spec.measured)


@dataclass(slots=True)
class Tally:
    """What passed through for one request; ``capture`` is None unless a JSON meter needs the body."""

    started: float = field(default_factory=time.perf_counter)
    request_bytes: int = 0
    response_bytes: int = 0
    capture: bytearray | None = None
    overflowed: bool = False
    cut: bool = False  # the exchange broke off: the upstream mid-body, or the client left

    async def count_request(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.request_bytes += len(chunk)
            yield chunk

    def saw_response(self, chunk: bytes) -> None:
        self.response_bytes += len(chunk)
        if self.capture is None or self.overflowed:
            return
        if len(self.capture) + len(chunk) > JSON_CAPTURE_LIMIT:
            self.overflowed = True
            self.capture = None
        else:
            self.capture += chunk

    def exchange(
        self, request_headers: Mapping[str, str], response_headers: Mapping[str, str], status: int
    ) -> Exchange:
        return Exchange(
            request_headers=request_headers,
            response_headers=response_headers,
            request_bytes=self.request_bytes,
            response_bytes=self.response_bytes,
            duration_ms=int((time.perf_counter() - self.started) * 1000),
            json_body=bytes(self.capture) if self.capture is not None else None,
            settles=not self.cut and status < 500,
        )


async def charge_response(
    components: Components, policy: Policy, verdict: Verdict, exchange: Exchange | None
) -> None:
    """Charge every measured meter of the admitted (plan, feature) and settle its reservation;
    ``exchange`` is None when the upstream never answered. Never raises for the store."""
    spec, customer, feature = verdict.spec, verdict.customer, verdict.feature
    if spec is None or customer is None or feature is None or not spec.measured:
        return
    amounts, distinct = _readings(components, spec, exchange) if exchange is not None else ({}, {})
    if not amounts and not distinct and not verdict.hold_id:
        return
    try:
        charged = await at_store_time(
            components.store,
            components.store.charge,
            lambda now: response_request(
                policy, customer, feature.name, spec, amounts, now, distinct, verdict.hold_id
            ),
        )
    except StoreUnavailable as error:
        components.metrics.store_errors.labels("charge").inc()
        log.warning("response-time usage of %s not charged now: %s", feature.name, error)
        # The journal merges the real amounts later; a reservation left held expires by itself.
        unsent = response_request(
            policy, customer, feature.name, spec, amounts, components.store.time(), distinct
        )
        keep_in_journal(
            components.journal, components.metrics, components.store.time, unsent, "charge", error.call
        )
        return
    if policy.billing and (amounts or distinct):
        components.marks.note(customer.id, charged.store_time, policy.billing)


def _readings(
    components: Components, spec: ChargeSpec, exchange: Exchange
) -> tuple[dict[str, int], dict[str, str]]:
    """The amount each measured meter read, and the value each unique meter saw."""
    amounts: dict[str, int] = {}
    distinct: dict[str, str] = {}
    for meter in spec.measured:
        if meter.reserve is not None and not exchange.settles:
            continue  # the reservation is released: an upstream failure or a client gone costs nothing
        if meter.aggregation is Aggregation.UNIQUE:
            text = measure_text(meter.source, exchange)
            if text is not None:
                distinct[meter.name] = text
                continue
        else:
            amount = measure(meter.source, exchange)
            if amount is not None:
                amounts[meter.name] = amount
                continue
        components.metrics.unmeasured.labels(meter.name).inc()
    return amounts, distinct
