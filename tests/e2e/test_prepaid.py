"""Prepaid credit and reserve-and-settle through the proxy and the admin API, on real Redis.

The upstream is a small LLM-like API that answers `usage.total_tokens` (what the request's
`use` field says, or its max_tokens) and can be told to fail.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import SidecarFactory
from tests.helpers import Client, ServerFactory, key_hash, serve, write_policy
from tests.topologies import on_topologies

KEY = "acme-key-1"
HEADERS = {"X-API-Key": KEY}


async def _completion(request: web.Request) -> web.StreamResponse:
    prompt = await request.json()
    if prompt.get("fail"):
        return web.json_response({"error": "overloaded"}, status=503)
    tokens = prompt.get("use", prompt.get("max_tokens", 10))
    if prompt.get("stream"):
        return await _slow_stream(request, tokens)
    return web.json_response({"echo": prompt, "usage": {"total_tokens": tokens}})


async def _slow_stream(request: web.Request, tokens: int) -> web.StreamResponse:
    """A JSON answer sent in pieces over a few seconds, so a client can leave in the middle."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(b'{"text": "')
    for _ in range(50):
        await asyncio.sleep(0.05)
        await response.write(b"x" * 1024)
    await response.write(json.dumps({"usage": {"total_tokens": tokens}}).encode()[1:])
    return response


@pytest.fixture
async def llm(aiohttp_server: ServerFactory) -> str:
    app = web.Application()
    app.router.add_post("/v1/completions", _completion)
    return await serve(aiohttp_server, app)


def credits_policy(tmp_path: Path, allowance: str = "") -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters:
          tokens:
            aggregation: sum
            source: response.json:usage.total_tokens
            reserve: request.json:max_tokens
            reserve_default: 500
        features: [{{name: complete, match: {{method: POST, path: /v1/completions}}}}]
        plans:
          credits:
            features: [complete]
            prepaid: [tokens]
            {allowance}
        customers: {{acme: {{plan: credits, api_keys: ["{key_hash(KEY)}"]}}}}
        """,
    )


async def grant(admin: Client, amount: int, grant_id: str = "pack-1", **extra: Any) -> tuple[int, Any]:
    body = {"id": grant_id, "meter": "tokens", "amount": amount, **extra}
    response = await admin.post("/admin/customers/acme/grants", json=body)
    return response.status, await response.json(content_type=None)


async def complete(client: Client, **prompt: Any) -> tuple[int, Any]:
    response = await client.post("/v1/completions", json=prompt, headers=HEADERS)
    return response.status, await response.json(content_type=None)


async def prepaid_row(admin: Client) -> dict[str, Any]:
    document = await (await admin.get("/admin/customers/acme/usage")).json()
    return next(row for row in document["limits"] if row["period"] == "prepaid")


async def test_a_retried_grant_counts_once_and_shows_in_the_usage_document(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    admin = await sidecar(credits_policy(tmp_path), llm, admin=True)
    assert (await grant(admin, 1000))[0] == 201
    status, body = await grant(admin, 1000)
    assert (status, body["status"]) == (200, "repeated")
    assert await prepaid_row(admin) == {
        "meter": "tokens",
        "period": "prepaid",
        "feature": None,
        "limit": 1000,
        "used": 0,
        "remaining": 1000,
        "reset": None,
    }


async def test_a_grant_id_reused_for_another_amount_is_a_conflict(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    admin = await sidecar(credits_policy(tmp_path), llm, admin=True)
    await grant(admin, 1000)
    assert (await grant(admin, 5000))[0] == 409
    assert (await prepaid_row(admin))["limit"] == 1000


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"id": "x", "meter": "tokens", "amount": 0}, "amount must be a whole number >= 1"),
        (
            {"id": "x", "meter": "requests", "amount": 5},
            "meter must be a prepaid meter of some plan (tokens)",
        ),
        ({"meter": "tokens", "amount": 5}, "id must be a string"),
        ({"id": "x", "meter": "tokens", "amount": 5, "expires_at": "2001-01-01T00:00:00Z"}, "in the past"),
        ({"id": "x", "meter": "tokens", "amount": 5, "expires_at": "tomorrow"}, "RFC 3339"),
    ],
)
async def test_a_bad_grant_is_refused_with_the_reason(
    sidecar: SidecarFactory, tmp_path: Path, llm: str, body: dict[str, Any], message: str
) -> None:
    admin = await sidecar(credits_policy(tmp_path), llm, admin=True)
    response = await admin.post("/admin/customers/acme/grants", json=body)
    assert response.status == 422
    errors = (await response.json(content_type=None))["errors"]
    assert any(message in error for error in errors), errors


async def test_a_grant_for_an_unknown_customer_is_404(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    admin = await sidecar(credits_policy(tmp_path), llm, admin=True)
    response = await admin.post(
        "/admin/customers/nobody/grants", json={"id": "x", "meter": "tokens", "amount": 5}
    )
    assert response.status == 404


async def test_no_credit_refuses_with_a_prepaid_problem(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    client = await sidecar(credits_policy(tmp_path), llm)
    response = await client.post("/v1/completions", json={"max_tokens": 10}, headers=HEADERS)
    assert response.status == 429
    body = await response.json(content_type="application/problem+json")
    assert (body["meter"], body["period"], body["limit"], body["remaining"], body["reset"]) == (
        "tokens",
        "prepaid",
        0,
        0,
        None,
    )
    assert body["violated-policies"] == ["tokens-prepaid"]
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["RateLimit-Policy"] == '"tokens-prepaid";q=0;sc-qu="tokens"'


async def test_a_request_is_held_its_max_tokens_and_settled_to_what_it_used(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    policy = credits_policy(tmp_path)
    admin, client = await sidecar(policy, llm, admin=True), await sidecar(policy, llm)
    await grant(admin, 1000)
    assert (await complete(client, max_tokens=2000))[0] == 429  # could not be covered if it used them all
    status, body = await complete(client, max_tokens=800, use=300, prompt="hello")
    assert status == 200
    assert body["echo"] == {
        "max_tokens": 800,
        "use": 300,
        "prompt": "hello",
    }  # the body read ahead arrives whole
    assert (await prepaid_row(admin))["remaining"] == 700


async def test_a_request_without_max_tokens_holds_the_default(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    policy = credits_policy(tmp_path)
    admin, client = await sidecar(policy, llm, admin=True), await sidecar(policy, llm)
    await grant(admin, 400)
    assert (await complete(client, use=10))[0] == 429  # the default hold (500) is more than the credit
    await grant(admin, 600, grant_id="pack-2")
    assert (await complete(client, use=10))[0] == 200
    assert (await prepaid_row(admin))["remaining"] == 990


async def test_an_upstream_failure_releases_the_reservation(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    policy = credits_policy(tmp_path)
    admin, client = await sidecar(policy, llm, admin=True), await sidecar(policy, llm)
    await grant(admin, 1000)
    assert (await complete(client, max_tokens=900, fail=True))[0] == 503
    assert (await prepaid_row(admin))["remaining"] == 1000


async def test_a_client_that_leaves_mid_response_releases_the_reservation(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    policy = credits_policy(tmp_path)
    admin, client = await sidecar(policy, llm, admin=True), await sidecar(policy, llm)
    await grant(admin, 1000)
    response = await client.post(
        "/v1/completions", json={"max_tokens": 900, "use": 300, "stream": True}, headers=HEADERS
    )
    assert response.status == 200
    await response.content.readany()
    assert (await prepaid_row(admin))["remaining"] == 100  # held while the answer streams
    response.close()
    for _ in range(100):
        if (await prepaid_row(admin))["remaining"] == 1000:
            break
        await asyncio.sleep(0.05)
    assert (await prepaid_row(admin))["remaining"] == 1000


async def test_the_monthly_allowance_is_used_before_credit(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    policy = credits_policy(tmp_path, allowance="limits: [{meter: tokens, limit: 500, period: month}]")
    admin, client = await sidecar(policy, llm, admin=True), await sidecar(policy, llm)
    await grant(admin, 1000)
    for _ in range(3):
        assert (await complete(client, max_tokens=300))[0] == 200
    rows = {
        row["period"]: row
        for row in (await (await admin.get("/admin/customers/acme/usage")).json())["limits"]
    }
    assert (rows["month"]["used"], rows["prepaid"]["used"], rows["prepaid"]["remaining"]) == (500, 400, 600)


async def test_a_request_past_the_allowance_and_the_credit_is_refused_by_the_credit_alone(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    policy = credits_policy(tmp_path, allowance="limits: [{meter: tokens, limit: 500, period: month}]")
    admin, client = await sidecar(policy, llm, admin=True), await sidecar(policy, llm)
    await grant(admin, 100)
    response = await client.post("/v1/completions", json={"max_tokens": 700}, headers=HEADERS)
    assert response.status == 429
    body = await response.json(content_type="application/problem+json")
    assert (body["period"], body["violated-policies"]) == ("prepaid", ["tokens-prepaid"])
    assert response.headers["Retry-After"] == "60"  # a grant lifts it, not the month's end


@on_topologies("single", "cluster")
async def test_concurrent_reserved_requests_on_two_replicas_never_overdraw(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    policy = credits_policy(tmp_path)
    admin = await sidecar(policy, llm, admin=True)
    replicas = [await sidecar(policy, llm), await sidecar(policy, llm)]
    await grant(admin, 1000)
    statuses = await asyncio.gather(*(complete(replicas[n % 2], max_tokens=70) for n in range(60)))
    codes = [status for status, _ in statuses]
    assert codes.count(200) == 14 and codes.count(429) == 46
    row = await prepaid_row(admin)
    assert (row["used"], row["remaining"]) == (980, 20)


@on_topologies("single", "cluster")
async def test_concurrent_requests_that_use_less_than_they_hold_are_charged_exactly_what_they_used(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    policy = credits_policy(tmp_path)
    admin = await sidecar(policy, llm, admin=True)
    replicas = [await sidecar(policy, llm), await sidecar(policy, llm)]
    await grant(admin, 5000)
    uses = random.Random(4).choices(range(1, 201), k=120)
    answers = await asyncio.gather(
        *(complete(replicas[n % 2], max_tokens=200, use=use) for n, use in enumerate(uses))
    )
    used = sum(use for use, (status, _) in zip(uses, answers, strict=True) if status == 200)
    assert {status for status, _ in answers} <= {200, 429}
    row = await prepaid_row(admin)
    assert (row["used"], row["remaining"]) == (used, 5000 - used)
    assert row["remaining"] >= 0
