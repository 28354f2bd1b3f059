"""http.problems: verdicts (decided by the gate on the in-memory store) become statuses, problem+json
bodies, RateLimit fields and Retry-After."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.admission.gate import admit
from sidecar.admission.verdict import Decision, Verdict
from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.model import Policy
from sidecar.config.policy.windows import calendar_window, rfc3339
from sidecar.http.problems import (
    CREDIT_RETRY_AFTER,
    PROBLEM_JSON,
    QUOTA_EXCEEDED,
    ratelimit_headers,
    refusal,
)
from sidecar.store.memory import MemoryStore
from sidecar.store.port import Grant
from tests.helpers import ACME, ManualClock, PolicyCustomers, key_hash, write_policy

BOB, CAROL = "bob-key-1", "carol-key-1"  # free, prepaid (acme is pro)
SEARCH, COMPLETE = "GET /v1/search", "POST /v1/completions"
POLICY = f"""
version: 1
meters:
  requests: {{aggregation: count}}
  tokens: {{aggregation: sum, source: "response.header:X-Tokens"}}
  units: {{aggregation: sum}}
  egress: {{aggregation: sum, source: response.bytes}}
features:
  - {{name: search, match: {{method: GET, path: /v1/search}}}}
  - {{name: export, match: {{method: POST, path: /v1/export}}}}
  - {{name: complete, match: {{method: POST, path: /v1/completions}}, cost: {{units: 40}}}}
plans:
  free:
    features: [search]
    limits:
      - {{meter: requests, limit: 3, period: month}}
      - {{meter: requests, limit: 2, period: minute}}
  pro:
    features: [search]
    limits:
      - {{meter: requests, limit: 1000, period: month}}
      - {{meter: requests, limit: 10, period: second}}
      - {{meter: requests, limit: 50, period: day, on_exceed: allow}}
      - {{meter: tokens, limit: 5000, period: month}}
      - {{meter: egress, limit: 1000000, period: day}}
  prepaid:
    features: [complete]
    prepaid: [units]
customers:
  acme: {{plan: pro, api_keys: ["{key_hash(ACME)}"]}}
  bob: {{plan: free, api_keys: ["{key_hash(BOB)}"]}}
  carol: {{plan: prepaid, api_keys: ["{key_hash(CAROL)}"]}}
"""


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return load_policy(write_policy(tmp_path, POLICY))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(clock: ManualClock) -> MemoryStore:
    return MemoryStore(clock=clock)


async def decide(policy: Policy, store: MemoryStore, key: str | None, route: str = SEARCH) -> Verdict:
    method, path = route.split(" ")
    headers = {} if key is None else {"X-API-Key": key}
    return await admit(policy, PolicyCustomers(), store, method, path, headers)


def answer(verdict: Verdict, policy: Policy, route: str = SEARCH) -> tuple[web.Response, dict[str, Any]]:
    """The response for a verdict that does not forward, and its problem body."""
    response = refusal(verdict, policy, *route.split(" "))
    assert response.content_type == PROBLEM_JSON
    assert isinstance(response.body, bytes)
    return response, json.loads(response.body)


@pytest.mark.parametrize(
    ("key", "route", "status", "title"),
    [
        (ACME, "GET /v2/nothing", 404, "Not Found"),
        (None, SEARCH, 401, "Unauthorized"),
        ("not-a-key", SEARCH, 401, "Unauthorized"),
        (BOB, "POST /v1/export", 403, "Forbidden"),
        (ACME, COMPLETE, 403, "Forbidden"),
    ],
)
async def test_each_refusing_decision_has_its_status_and_a_problem_body(
    policy: Policy, store: MemoryStore, key: str | None, route: str, status: int, title: str
) -> None:
    response, body = answer(await decide(policy, store, key, route), policy, route)
    assert (response.status, body["status"], body["title"]) == (status, status, title)
    assert body["type"] == "about:blank" and body["detail"]


async def test_401_names_where_the_key_goes_and_asks_for_bearer(policy: Policy, store: MemoryStore) -> None:
    response, body = answer(await decide(policy, store, None), policy)
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert body["detail"] == "a valid API key is required in X-API-Key or Authorization: Bearer <key>"


async def test_403_names_the_feature_and_the_plan(policy: Policy, store: MemoryStore) -> None:
    _, body = answer(await decide(policy, store, ACME, COMPLETE), policy, COMPLETE)
    assert (body["feature"], body["plan"]) == ("complete", "pro")


async def test_503_during_an_outage_says_retry_after_a_second(policy: Policy, store: MemoryStore) -> None:
    store.down = True
    verdict = await decide(policy, store, BOB)
    response, _ = answer(verdict, policy)
    assert verdict.decision is Decision.UNAVAILABLE
    assert (response.status, response.headers["Retry-After"]) == (503, "1")


async def test_429_names_the_limit_that_keeps_the_request_out_longest(
    policy: Policy, store: MemoryStore, clock: ManualClock
) -> None:
    for _ in range(2):  # two in the minute, at 0 s and 20 s
        await decide(policy, store, BOB)
        clock.now += 20
    assert (await decide(policy, store, BOB)).decision is Decision.REFUSED  # at 40 s, by the minute
    clock.now += 30
    assert (await decide(policy, store, BOB)).decision is Decision.ADMITTED  # at 70 s: the month's third
    refused = await decide(policy, store, BOB)  # both refuse now; the month for longer
    response, body = answer(refused, policy)
    month_end = calendar_window(refused.limits[0].charge.limit.period, clock.now)[1]
    assert response.status == 429 and body["type"] == QUOTA_EXCEEDED
    assert body["violated-policies"] == ["requests-month", "requests-minute"]
    assert (body["meter"], body["limit"], body["period"], body["remaining"]) == ("requests", 3, "month", 0)
    assert body["reset"] == rfc3339(month_end)
    assert response.headers["Retry-After"] == str(math.ceil(month_end - clock.now))


async def test_retry_after_is_when_the_moving_window_frees_a_unit(
    policy: Policy, store: MemoryStore, clock: ManualClock
) -> None:
    await decide(policy, store, BOB)
    clock.now += 20
    await decide(policy, store, BOB)
    clock.now += 10  # at 30 s: the unit taken at 0 s comes back at 60 s
    response, body = answer(await decide(policy, store, BOB), policy)
    assert body["violated-policies"] == ["requests-minute"]
    assert (body["period"], body["remaining"]) == ("minute", 0)
    assert response.headers["Retry-After"] == "30"
    assert '"requests-minute";r=0;t=30' in response.headers["RateLimit"]


async def test_used_up_credit_says_retry_after_a_minute_and_names_the_credit(
    policy: Policy, store: MemoryStore
) -> None:
    await store.grant("carol", Grant(id="pack", meter="units", amount=100))
    decisions = [(await decide(policy, store, CAROL, COMPLETE)).decision for _ in range(3)]
    assert decisions == [Decision.ADMITTED, Decision.ADMITTED, Decision.REFUSED]
    response, body = answer(await decide(policy, store, CAROL, COMPLETE), policy, COMPLETE)
    assert response.headers["Retry-After"] == str(CREDIT_RETRY_AFTER)
    named = (body["meter"], body["period"], body["limit"], body["remaining"], body["reset"])
    assert named == ("units", "prepaid", 100, 20, None)
    assert body["violated-policies"] == ["units-prepaid"]
    assert response.headers["RateLimit"] == '"units-prepaid";r=20'
    assert response.headers["RateLimit-Policy"] == '"units-prepaid";q=100;sc-qu="units"'


async def test_ratelimit_fields_list_hard_limits_tightest_first_with_their_units(
    policy: Policy, store: MemoryStore, clock: ManualClock
) -> None:
    admitted = await decide(policy, store, ACME)
    fields = ratelimit_headers(admitted.limits, admitted.credits, policy.meters)
    start, end = calendar_window(admitted.limits[0].charge.limit.period, clock.now)
    assert fields["RateLimit-Policy"].split(", ") == [
        f'"requests-month";q=1000;w={end - start}',
        f'"tokens-month";q=5000;w={end - start};sc-qu="tokens"',
        '"requests-second";q=10;w=1',
        '"egress-day";q=1000000;w=86400;qu="content-bytes"',
    ]  # the soft requests-day is left out: it never throttles
    assert fields["RateLimit"].split(", ")[:3] == [
        f'"requests-month";r=999;t={math.ceil(end - clock.now)}',
        f'"tokens-month";r=5000;t={math.ceil(end - clock.now)}',
        '"requests-second";r=9;t=1',
    ]


def test_no_limit_and_no_credit_means_no_ratelimit_fields() -> None:
    assert ratelimit_headers(()) == {}
