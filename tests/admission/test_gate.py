"""admission.gate.admit on the in-memory store: routes x plans -> decisions, refusals as values,
a store outage by store_failure, stale windows rebuilt, and the deny cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.admission.deny_cache import DenyCache
from sidecar.admission.gate import admit
from sidecar.admission.verdict import Decision, Verdict
from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.model import Policy
from sidecar.store.memory import MemoryStore
from sidecar.store.port import MeterRequest
from tests.helpers import ACME, ManualClock, PolicyCustomers, key_hash, write_policy

BOB, EVE, OLA = "bob-key-1", "eve-key-1", "ola-key-1"  # free, shadow, open (acme is pro)
POLICY = f"""
version: 1
meters:
  requests: {{aggregation: count}}
  tokens: {{aggregation: sum, source: "response.header:X-Tokens", reserve: 50}}
features:
  - {{name: health, match: {{path: /healthz}}, public: true}}
  - {{name: search, match: {{method: GET, path: /v1/search}}}}
  - {{name: export, match: {{method: POST, path: "/v1/exports/{{id}}"}}, cost: {{requests: 10}}}}
  - {{name: complete, match: {{method: POST, path: /v1/completions}}}}
plans:
  free:
    features: [search]
    limits: [{{meter: requests, limit: 3, period: month}}]
  pro:
    features: [search, export, complete]
    limits:
      - {{meter: requests, limit: 25, period: month}}
      - {{meter: requests, limit: 100, period: second}}
      - {{meter: tokens, limit: 120, period: day, feature: complete}}
  trial:
    shadow: true
    features: [search]
    limits: [{{meter: requests, limit: 1, period: month}}]
  lenient:
    store_failure: open
    features: [search]
    limits: [{{meter: requests, limit: 3, period: month}}]
customers:
  acme: {{plan: pro, api_keys: ["{key_hash(ACME)}"]}}
  bob: {{plan: free, api_keys: ["{key_hash(BOB)}"]}}
  eve: {{plan: trial, api_keys: ["{key_hash(EVE)}"]}}
  ola: {{plan: lenient, api_keys: ["{key_hash(OLA)}"]}}
"""


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return load_policy(write_policy(tmp_path, POLICY))


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


async def ask(
    policy: Policy,
    store: MemoryStore,
    key: str | None,
    route: str = "GET /v1/search",
    denials: DenyCache | None = None,
) -> Verdict:
    method, path = route.split(" ")
    headers = {} if key is None else {"X-API-Key": key}
    return await admit(policy, PolicyCustomers(), store, method, path, headers, denials=denials)


@pytest.mark.parametrize(
    ("route", "key", "decision"),
    [
        ("GET /healthz", None, Decision.PUBLIC),
        ("GET /v2/unknown", ACME, Decision.NOT_FOUND),
        ("POST /v1/search", ACME, Decision.NOT_FOUND),  # a method outside the feature's
        ("GET /v1/search", None, Decision.UNAUTHORIZED),
        ("GET /v1/search", "not-a-key", Decision.UNAUTHORIZED),
        ("GET /v1/search", ACME, Decision.ADMITTED),
        ("GET /v1/search", BOB, Decision.ADMITTED),
        ("POST /v1/exports/7", ACME, Decision.ADMITTED),
        ("POST /v1/exports/7", BOB, Decision.FORBIDDEN),
        ("POST /v1/completions", BOB, Decision.FORBIDDEN),
        ("POST /v1/completions", ACME, Decision.ADMITTED),
        ("GET /v1/search", EVE, Decision.ADMITTED),
    ],
)
async def test_routes_and_plans_decide(
    policy: Policy, store: MemoryStore, route: str, key: str | None, decision: Decision
) -> None:
    assert (await ask(policy, store, key, route)).decision is decision


async def test_an_admitted_request_is_metered_and_names_its_customer_plan_and_limits(
    policy: Policy, store: MemoryStore
) -> None:
    verdict = await ask(policy, store, ACME)
    assert verdict.customer is not None and verdict.plan is not None and verdict.feature is not None
    assert (verdict.customer.id, verdict.plan.name, verdict.feature.name) == ("acme", "pro", "search")
    assert {s.charge.limit.name: s.used for s in verdict.limits} == {
        "requests-month": 1,
        "requests-second": 1,
    }
    assert verdict.forwards and verdict.store_time == pytest.approx(store.time(), abs=1)


async def test_a_quota_refuses_once_used_up_and_the_refusal_charges_nothing(
    policy: Policy, store: MemoryStore
) -> None:
    decisions = [(await ask(policy, store, BOB)).decision for _ in range(4)]
    assert decisions == [Decision.ADMITTED] * 3 + [Decision.REFUSED]
    refused = await ask(policy, store, BOB)
    assert [s.charge.limit.name for s in refused.refusing] == ["requests-month"]
    assert refused.refusing[0].used == 3 and not refused.forwards


async def test_a_weighted_cost_is_all_or_nothing(policy: Policy, store: MemoryStore) -> None:
    decisions = [(await ask(policy, store, ACME, "POST /v1/exports/1")).decision for _ in range(3)]
    assert decisions == [Decision.ADMITTED, Decision.ADMITTED, Decision.REFUSED]
    search = await ask(policy, store, ACME)
    assert {s.charge.limit.name: s.used for s in search.limits}["requests-month"] == 21


async def test_a_shadow_plan_admits_past_its_limit_and_reports_what_it_would_refuse(
    policy: Policy, store: MemoryStore
) -> None:
    first, second = [await ask(policy, store, EVE) for _ in range(2)]
    assert (first.decision, second.decision) == (Decision.ADMITTED, Decision.ADMITTED)
    assert first.shadow_refusals == ()
    assert [s.charge.limit.name for s in second.shadow_refusals] == ["requests-month"]


async def test_a_reserving_meter_holds_its_reserve_until_the_request_settles(
    policy: Policy, store: MemoryStore
) -> None:
    held = await ask(policy, store, ACME, "POST /v1/completions")
    assert held.decision is Decision.ADMITTED and held.hold_id
    assert {s.charge.limit.name: s.used for s in held.limits}["tokens-day-complete"] == 50
    second = await ask(policy, store, ACME, "POST /v1/completions")
    third = await ask(policy, store, ACME, "POST /v1/completions")  # 150 > 120: the reserve does not fit
    assert (second.decision, third.decision) == (Decision.ADMITTED, Decision.REFUSED)
    assert third.hold_id == ""


@pytest.mark.parametrize(
    ("key", "decision"), [(BOB, Decision.UNAVAILABLE), (OLA, Decision.ADMITTED_UNMETERED)]
)
async def test_a_store_outage_is_answered_by_the_plans_store_failure(
    policy: Policy, store: MemoryStore, key: str, decision: Decision
) -> None:
    store.down = True
    verdict = await ask(policy, store, key)
    assert verdict.decision is decision
    if decision is Decision.ADMITTED_UNMETERED:  # kept for the journal, to be merged later
        assert isinstance(verdict.unrecorded, MeterRequest) and verdict.unrecorded.customer_id == "ola"


class LaggingStore(MemoryStore):
    """A store whose clock, as the sidecar estimates it, is a month behind the store's own."""

    def time(self) -> float:
        return super().time() - 40 * 86400


async def test_a_stale_calendar_window_is_rebuilt_for_the_stores_time(policy: Policy) -> None:
    store = LaggingStore()
    verdicts = [await ask(policy, store, BOB) for _ in range(4)]
    assert [v.decision for v in verdicts] == [Decision.ADMITTED] * 3 + [Decision.REFUSED]
    assert verdicts[0].store_time > store.time() + 39 * 86400  # the store's own time


async def test_the_deny_cache_answers_a_known_refusal_without_the_store_until_it_resets(
    policy: Policy, store: MemoryStore
) -> None:
    clock = ManualClock(1000.0)  # monotonic seconds
    denials = DenyCache(clock=clock)
    for _ in range(4):
        refused = await ask(policy, store, BOB, denials=denials)
    assert refused.decision is Decision.REFUSED
    store.down = True  # the store is not asked: the cached refusal is the answer, aged
    clock.now += 10
    cached = await ask(policy, store, BOB, denials=denials)
    assert (cached.decision, denials.hits) == (Decision.REFUSED, 1)
    assert cached.limits[0].reset_seconds == pytest.approx(refused.limits[0].reset_seconds - 10)
    clock.now += 60  # past the longest a refusal is cached: the store is asked again
    assert (await ask(policy, store, BOB, denials=denials)).decision is Decision.UNAVAILABLE


async def test_the_deny_cache_is_per_feature_and_not_used_for_an_admission(
    policy: Policy, store: MemoryStore
) -> None:
    denials = DenyCache()
    verdicts = [await ask(policy, store, ACME, "POST /v1/exports/1", denials) for _ in range(3)]
    assert [v.decision for v in verdicts] == [Decision.ADMITTED, Decision.ADMITTED, Decision.REFUSED]
    assert len(denials) == 1
    assert (await ask(policy, store, ACME, denials=denials)).decision is Decision.ADMITTED  # search
    assert denials.hits == 0
