"""Soft limits (on_exceed: allow) and shadow limits or plans meter past their ceiling and never refuse."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from sidecar.http.components import COMPONENTS
from tests.conftest import SidecarFactory
from tests.helpers import Upstream, key_hash, write_policy

KEY = "acme-key-1"


def policy(tmp_path: Path, plan_extra: str, limit_extra: str) -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters: {{requests: {{aggregation: count}}}}
        features: [{{name: search, match: {{path: /v1/search}}}}]
        plans:
          p:
            features: [search]
            {plan_extra}
            limits:
              - {{meter: requests, limit: 2, period: day{limit_extra}}}
              - {{meter: requests, limit: 100, period: month}}
        customers: {{acme: {{plan: p, api_keys: ["{key_hash(KEY)}"]}}}}
        """,
    )


async def statuses_and_last(
    client: TestClient[web.Request, web.Application], count: int
) -> tuple[list[int], ClientResponse]:
    statuses = []
    for _ in range(count):
        response = await client.get("/v1/search", headers={"X-API-Key": KEY})
        await response.read()
        statuses.append(response.status)
    return statuses, response


async def test_soft_limit_serves_past_its_ceiling_and_keeps_counting(
    sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy(tmp_path, "", ", on_exceed: allow"), upstream.url)
    statuses, last = await statuses_and_last(client, 4)
    assert statuses == [200] * 4 and len(upstream.seen) == 4
    assert '"requests-month";r=96;' in last.headers["RateLimit"]
    assert "Sidecar-Shadow-Refusal" not in last.headers


async def test_soft_limit_is_left_out_of_the_ratelimit_fields_and_still_shown_in_usage(
    sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream
) -> None:
    """SPEC §4: a soft limit never throttles, so a client must not read it as r=0 and stop calling."""
    client = await sidecar(policy(tmp_path, "", ", on_exceed: allow"), upstream.url)
    _, last = await statuses_and_last(client, 3)
    assert last.headers["RateLimit-Policy"].startswith('"requests-month";q=100;w=')
    assert last.headers["RateLimit"].startswith('"requests-month";r=97;t=')
    assert "requests-day" not in last.headers["RateLimit-Policy"] + last.headers["RateLimit"]
    usage = await (await client.get("/_sidecar/usage", headers={"X-API-Key": KEY})).json()
    day = next(item for item in usage["limits"] if item["period"] == "day")
    assert (day["limit"], day["used"]) == (2, 3)


@pytest.mark.parametrize(
    ("plan_extra", "limit_extra"),
    [("", ", shadow: true"), ("shadow: true", "")],
    ids=["shadow-limit", "shadow-plan"],
)
async def test_shadow_reports_would_be_refusals_in_header_metric_and_log(
    sidecar: SidecarFactory,
    tmp_path: Path,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
    plan_extra: str,
    limit_extra: str,
) -> None:
    client = await sidecar(policy(tmp_path, plan_extra, limit_extra), upstream.url)
    with caplog.at_level(logging.INFO, logger="sidecar.http.proxy"):
        statuses, last = await statuses_and_last(client, 4)
    assert statuses == [200] * 4
    assert last.headers["Sidecar-Shadow-Refusal"] == "requests-day"
    registry = client.app[COMPONENTS].metrics.registry
    assert (
        registry.get_sample_value("sidecar_shadow_refusals_total", {"plan": "p", "limit": "requests-day"})
        == 2
    )
    assert sum("would have been refused by requests-day" in r.getMessage() for r in caplog.records) == 2
