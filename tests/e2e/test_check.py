"""POST /admin/customers/{id}/check (SPEC §7): would it be admitted now? The usage document's rows
plus ``allowed``, one read of the store, nothing recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.http.events_api import BATCH
from tests.conftest import SidecarFactory
from tests.helpers import ACME, Client, Upstream, key_hash, write_policy


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters:
          requests: {{aggregation: count}}
          gpu_seconds: {{aggregation: sum, source: event}}
          tokens: {{aggregation: sum, source: event}}
        features:
          - {{name: search, match: {{path: /v1/search}}}}
          - {{name: export, match: {{path: /v1/export}}, cost: {{requests: 10}}}}
          - {{name: docs, match: {{path: /docs}}, public: true}}
        plans:
          p:
            features: [search, export]
            limits:
              - {{meter: requests, limit: 15, period: month}}
              - {{meter: requests, limit: 50, period: second}}
              - {{meter: gpu_seconds, limit: 100, period: day}}
          credits:
            features: [search]
            prepaid: [tokens]
        customers:
          acme: {{plan: p, api_keys: ["{key_hash(ACME)}"]}}
          bob: {{plan: credits}}
        """,
    )


async def check(admin: Client, body: object, customer: str = "acme") -> tuple[int, Any]:
    response = await admin.post(f"/admin/customers/{customer}/check", json=body)
    return response.status, await response.json()


@pytest.fixture
async def admin(sidecar: SidecarFactory, policy: Path, upstream: Upstream) -> Client:
    return await sidecar(policy, upstream.url, admin=True)


async def test_a_feature_is_allowed_while_every_limit_has_room_and_nothing_is_recorded(admin: Client) -> None:
    status, answer = await check(admin, {"feature": "export"})
    assert (status, answer["allowed"], answer["violated-policies"]) == (200, True, [])
    rows = {(r["meter"], r["period"]): (r["used"], r["limit"], r["remaining"]) for r in answer["limits"]}
    assert rows == {
        ("requests", "month"): (0, 15, 15),
        ("requests", "second"): (0, 50, 50),
        ("gpu_seconds", "day"): (0, 100, 100),
    }
    for _ in range(3):
        await check(admin, {"feature": "export"})
    usage = await admin.get("/admin/customers/acme/usage")
    assert all(row["used"] == 0 for row in (await usage.json())["limits"])


async def test_a_feature_whose_cost_does_not_fit_is_not_allowed(admin: Client) -> None:
    body = [
        {
            "specversion": "1.0",
            "id": "r",
            "source": "s",
            "type": "requests",
            "subject": "acme",
            "data": {"value": 6},
        }
    ]
    await admin.post("/admin/events", data=json.dumps(body), headers={"Content-Type": BATCH})
    _, answer = await check(admin, {"feature": "export"})  # 10 more on 6 of 15
    assert (answer["allowed"], answer["violated-policies"]) == (False, ["requests-month"])
    _, answer = await check(admin, {"feature": "search"})  # 1 fits
    assert answer["allowed"] is True
    _, answer = await check(admin, {"feature": "search", "costs": {"requests": 10}})
    assert answer["allowed"] is False


async def test_costs_alone_ask_whether_enforced_records_would_be_accepted(admin: Client) -> None:
    _, answer = await check(admin, {"costs": {"gpu_seconds": 100}})
    assert (answer["allowed"], [r["period"] for r in answer["limits"]]) == (True, ["day"])
    _, answer = await check(admin, {"costs": {"gpu_seconds": 101, "requests": 3}})
    assert (answer["allowed"], answer["violated-policies"]) == (False, ["gpu_seconds-day"])
    assert [(r["meter"], r["period"]) for r in answer["limits"]] == [
        ("gpu_seconds", "day"),
        ("requests", "month"),
    ]


async def test_prepaid_credit_is_checked(admin: Client) -> None:
    _, answer = await check(admin, {"costs": {"tokens": 5}}, customer="bob")
    assert (answer["allowed"], answer["violated-policies"]) == (False, ["tokens-prepaid"])
    await admin.post("/admin/customers/bob/grants", json={"id": "g1", "meter": "tokens", "amount": 50})
    _, answer = await check(admin, {"costs": {"tokens": 5}}, customer="bob")
    assert answer["allowed"] is True
    assert answer["limits"] == [
        {
            "meter": "tokens",
            "period": "prepaid",
            "feature": None,
            "limit": 50,
            "used": 0,
            "remaining": 50,
            "reset": None,
        }
    ]


async def test_a_feature_outside_the_plan_and_a_public_one(admin: Client) -> None:
    _, answer = await check(admin, {"feature": "export"}, customer="bob")
    assert (answer["allowed"], answer["detail"]) == (
        False,
        "plan 'credits' does not include feature 'export'",
    )
    _, answer = await check(admin, {"feature": "docs"}, customer="bob")
    assert (answer["allowed"], answer["limits"]) == (True, [])


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({}, 'expected a JSON object with "feature"'),
        ({"feature": "nope"}, "feature must name a feature of the policy"),
        ({"costs": {"nope": 1}}, "costs: no meter 'nope'"),
        ({"costs": {"requests": -1}}, "costs.requests must be a whole number >= 0"),
        ({"feature": "search", "extra": 1}, "unknown field 'extra'"),
    ],
)
async def test_a_bad_question_is_422(admin: Client, body: object, error: str) -> None:
    status, answer = await check(admin, body)
    assert status == 422
    assert any(error in message for message in answer["errors"])


async def test_an_unknown_customer_is_404(admin: Client) -> None:
    status, _ = await check(admin, {"feature": "search"}, customer="nobody")
    assert status == 404
