"""Meters only the response tells (tokens, bytes, time): admitted while units remain, charged at the end."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from sidecar.http.components import COMPONENTS
from tests.conftest import SidecarFactory
from tests.helpers import ServerFactory, key_hash, serve, write_policy

KEY = "acme-key-1"
HEADERS = {"X-API-Key": KEY}


async def _completion(request: web.Request) -> web.Response:
    tokens = int(request.query.get("tokens", "400"))
    body = {"text": "x" * int(request.query.get("pad", "0")), "usage": {"total_tokens": tokens}}
    headers = {} if "no_header" in request.query else {"X-Usage-Tokens": str(tokens)}
    return web.json_response(body, headers=headers)


@pytest.fixture
async def llm(aiohttp_server: ServerFactory) -> str:
    app = web.Application()
    app.router.add_route("*", "/v1/completions", _completion)
    return await serve(aiohttp_server, app)


def policy_with(tmp_path: Path, source: str, *, billing: bool = False) -> Path:
    billing_section = "billing: {url: 'http://127.0.0.1:9/usage', interval: 60}" if billing else ""
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters:
          requests: {{aggregation: count}}
          tokens: {{aggregation: sum, source: "{source}"}}
          egress: {{aggregation: sum, source: response.bytes}}
          biggest: {{aggregation: max, source: response.bytes}}
          users: {{aggregation: unique, source: "request.header:X-User"}}
        features: [{{name: complete, match: {{path: /v1/completions}}}}]
        plans:
          llm:
            features: [complete]
            limits: [{{meter: tokens, limit: 1000, period: month}}]
        customers: {{acme: {{plan: llm, api_keys: ["{key_hash(KEY)}"]}}}}
        {billing_section}
        """,
    )


@pytest.mark.parametrize("source", ["response.header:X-Usage-Tokens", "response.json:usage.total_tokens"])
async def test_token_quota_is_crossed_by_the_third_call_and_refuses_the_fourth(
    sidecar: SidecarFactory, tmp_path: Path, llm: str, source: str
) -> None:
    client = await sidecar(policy_with(tmp_path, source), llm)
    statuses = []
    for _ in range(4):
        response = await client.post("/v1/completions", headers=HEADERS)
        await response.read()
        statuses.append(response.status)
    assert statuses == [200, 200, 200, 429]
    assert 'sc-qu="tokens"' in response.headers["RateLimit-Policy"]
    body = await response.json(content_type="application/problem+json")
    assert (body["meter"], body["remaining"]) == ("tokens", 0)


async def test_ratelimit_remaining_reflects_the_charge_of_the_previous_response(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    client = await sidecar(policy_with(tmp_path, "response.header:X-Usage-Tokens"), llm)
    first = await client.post("/v1/completions?tokens=250", headers=HEADERS)
    second = await client.post("/v1/completions?tokens=250", headers=HEADERS)
    assert first.headers["RateLimit"].startswith('"tokens-month";r=1000;')
    assert second.headers["RateLimit"].startswith('"tokens-month";r=750;')


async def test_unreadable_value_charges_nothing_and_is_counted(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    client = await sidecar(policy_with(tmp_path, "response.header:X-Usage-Tokens"), llm)
    for _ in range(3):
        assert (await client.post("/v1/completions?tokens=900&no_header=1", headers=HEADERS)).status == 200
    after = await client.post("/v1/completions", headers=HEADERS)
    assert after.headers["RateLimit"].startswith('"tokens-month";r=1000;')
    registry = client.app[COMPONENTS].metrics.registry
    assert registry.get_sample_value("sidecar_unmeasured_total", {"meter": "tokens"}) == 3


async def test_json_body_beyond_the_capture_limit_is_unmeasured_not_guessed(
    sidecar: SidecarFactory, tmp_path: Path, llm: str
) -> None:
    client = await sidecar(policy_with(tmp_path, "response.json:usage.total_tokens"), llm)
    big = await client.post("/v1/completions?tokens=900&pad=2000000", headers=HEADERS)
    assert len(await big.read()) > 2_000_000
    after = await client.post("/v1/completions", headers=HEADERS)
    assert after.headers["RateLimit"].startswith('"tokens-month";r=1000;')


async def test_measured_usage_lands_in_the_billing_summary(
    sidecar: SidecarFactory, tmp_path: Path, llm: str, redis_url: str
) -> None:
    client = await sidecar(policy_with(tmp_path, "response.header:X-Usage-Tokens", billing=True), llm)
    sizes = []
    for tokens, user in ((100, "ann"), (250, "bo"), (0, "ann")):
        response = await client.post(f"/v1/completions?tokens={tokens}", headers=HEADERS | {"X-User": user})
        sizes.append(len(await response.read()))
    redis = aioredis.Redis.from_url(redis_url)
    fields = {k.decode(): int(v) for k, v in (await redis.hgetall("sc:{c:acme}:u")).items()}
    await redis.aclose()
    usage = {k.split("|", 1)[1]: v for k, v in fields.items() if not k.startswith("u|")}
    distinct = sorted(k.rsplit("|", 1)[1] for k in fields if k.startswith("u|"))
    assert distinct == ["ann", "bo"]
    assert usage == {
        "requests|complete": 3,
        "tokens|complete": 350,
        "egress|complete": sum(sizes),
        "biggest|complete": max(sizes),
    }
