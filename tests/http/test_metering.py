"""http.metering.charge_response on the in-memory store: what a response told is charged to its
limits and recorded for billing, a reservation is settled or released, an unreadable value is
counted, and a store that is down leaves the usage to the journal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.admission.gate import admit
from sidecar.admission.sources import Exchange
from sidecar.admission.verdict import Decision, Verdict
from sidecar.config.policy.holder import PolicyHolder
from sidecar.config.settings import Settings
from sidecar.http.components import Components, compose
from sidecar.http.metering import charge_response
from sidecar.ledger.journal import Journal
from sidecar.store.memory import MemoryStore
from tests.helpers import ACME, ManualClock, PolicyCustomers, key_hash, without_windows, write_policy

COMPLETE, UPLOAD = "/v1/completions", "/v1/upload"
POLICY = f"""
version: 1
meters:
  requests: {{aggregation: count}}
  tokens: {{aggregation: sum, source: "response.json:usage.total_tokens", reserve: 100}}
  egress: {{aggregation: sum, source: "response.header:X-Egress"}}
  biggest: {{aggregation: max, source: response.bytes}}
  users: {{aggregation: unique, source: "request.header:X-User"}}
features:
  - {{name: complete, match: {{method: POST, path: {COMPLETE}}}}}
  - {{name: upload, match: {{method: POST, path: {UPLOAD}}}}}
plans:
  pro:
    features: [complete, upload]
    limits:
      - {{meter: tokens, limit: 1000, period: day, feature: complete}}
      - {{meter: egress, limit: 5000, period: month, feature: upload}}
customers:
  acme: {{plan: pro, api_keys: ["{key_hash(ACME)}"]}}
billing: {{url: "http://127.0.0.1:9/usage", interval: 60}}
"""


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def components(tmp_path: Path, clock: ManualClock) -> Components:
    holder = PolicyHolder.load(write_policy(tmp_path, POLICY))
    journal = Journal(tmp_path / "journal")
    return compose(Settings(), holder, MemoryStore(clock=clock), journal=journal)


def store_of(components: Components) -> MemoryStore:
    assert isinstance(components.store, MemoryStore)
    return components.store


async def admitted(components: Components, path: str) -> Verdict:
    policy = components.holder.current
    headers = {"X-API-Key": ACME}
    verdict = await admit(policy, PolicyCustomers(), components.store, "POST", path, headers)
    assert verdict.decision is Decision.ADMITTED
    return verdict


def exchange(
    headers: dict[str, str] | None = None, body: object = None, size: int = 0, *, settles: bool = True
) -> Exchange:
    """A response that carried ``headers`` and the JSON ``body`` (``size`` bytes in all)."""
    return Exchange(
        request_headers={"X-User": "ann"},
        response_headers=headers or {},
        request_bytes=0,
        response_bytes=size,
        duration_ms=5,
        json_body=None if body is None else json.dumps(body).encode(),
        settles=settles,
    )


async def settle(components: Components, verdict: Verdict, answer: Exchange | None) -> None:
    await charge_response(components, components.holder.current, verdict, answer)


def limits_used(verdict: Verdict) -> dict[str, int]:
    return {s.charge.limit.name: s.used for s in verdict.limits}


async def used(components: Components, path: str) -> dict[str, int]:
    """What each limit of the feature at ``path`` has used, read by a new admission."""
    return limits_used(await admitted(components, path))


def counted(components: Components, name: str, **labels: str) -> float | None:
    return components.metrics.registry.get_sample_value(name, labels)


def usage(components: Components) -> dict[str, int]:
    """Billing usage fields, billing windows left out."""
    return without_windows(store_of(components).usage("acme"))


async def test_a_measured_amount_is_charged_to_its_limit_and_recorded_for_billing(
    components: Components,
) -> None:
    verdict = await admitted(components, UPLOAD)
    await settle(components, verdict, exchange({"X-Egress": "1200"}, size=40))
    assert (await used(components, UPLOAD))["egress-month-upload"] == 1200
    assert usage(components) == {
        "requests|upload": 2,  # at admission (this request, and the one that read the limit)
        "egress|upload": 1200,
        "biggest|upload": 40,
        "u|users|upload|ann": 1,
    }
    assert list(components.marks.take()) == ["acme"]  # due for billing


async def test_a_reservation_is_settled_to_what_the_response_used(components: Components) -> None:
    verdict = await admitted(components, COMPLETE)
    assert verdict.hold_id and limits_used(verdict) == {"tokens-day-complete": 100}
    await settle(components, verdict, exchange(body={"usage": {"total_tokens": 30}}))
    after = await admitted(components, COMPLETE)  # holds 100 again, beside the 30 used
    assert limits_used(after) == {"tokens-day-complete": 130}
    assert usage(components)["tokens|complete"] == 30


@pytest.mark.parametrize("answer", [exchange(settles=False), None], ids=["upstream-failed", "never-answered"])
async def test_a_reservation_is_released_when_the_upstream_fails(
    components: Components, answer: Exchange | None
) -> None:
    verdict = await admitted(components, COMPLETE)
    await settle(components, verdict, answer)
    after = await admitted(components, COMPLETE)
    assert limits_used(after) == {"tokens-day-complete": 100}  # its own hold
    assert "tokens|complete" not in usage(components)


async def test_a_value_that_cannot_be_read_charges_nothing_and_is_counted(components: Components) -> None:
    verdict = await admitted(components, UPLOAD)
    await settle(components, verdict, exchange({"X-Egress": "lots"}))
    assert (await used(components, UPLOAD))["egress-month-upload"] == 0
    assert counted(components, "sidecar_unmeasured_total", meter="egress") == 1


async def test_a_charge_the_store_cannot_take_goes_to_the_journal(components: Components) -> None:
    verdict = await admitted(components, UPLOAD)
    store_of(components).down = True
    await settle(components, verdict, exchange({"X-Egress": "700"}))
    errors = components.metrics.registry.get_sample_value(
        "sidecar_store_errors_total", {"operation": "charge"}
    )
    assert errors == 1
    assert components.journal is not None and components.journal.pending == 1
    recorded = components.metrics.registry.get_sample_value(
        "sidecar_journal_recorded_total", {"source": "charge"}
    )
    assert recorded == 1
