"""POST /admin/events (SPEC §8) through real sidecar apps, a real upstream and real Redis: results
per record, the body's 400/413/415, counting like proxied usage, idempotency, enforce, exactness
with proxied traffic across two instances, event meters, and a late record amending a push."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.billing.pusher import Pusher
from sidecar.http.app import build_admin_app, build_proxy_app
from sidecar.http.events_api import BATCH, MAX_RECORDS, OPENMETER_PATH, SINGLE
from tests.conftest import SidecarFactory, make_components
from tests.helpers import (
    ACME,
    Client,
    ClientFactory,
    Receiver,
    Upstream,
    key_hash,
    loopback_client,
    write_policy,
)

BOB = "bob-key-1"
RATED = "rated-key-1"


def policy_file(tmp_path: Path, *, quota: int = 57, extra: str = "") -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters:
          requests: {{aggregation: count}}
          gpu_seconds: {{aggregation: sum, source: event}}
          tokens: {{aggregation: sum, source: event}}
          peak: {{aggregation: max, source: event}}
        features:
          - {{name: search, match: {{path: /v1/search}}}}
        plans:
          p:
            features: [search]
            limits:
              - {{meter: requests, limit: {quota}, period: month}}
              - {{meter: gpu_seconds, limit: 100, period: day}}
          credits:
            features: [search]
            prepaid: [tokens]
          rated:
            features: [search]
            limits:
              - {{meter: requests, limit: 3, period: minute}}
              - {{meter: requests, limit: 1000, period: month}}
        customers:
          acme: {{plan: p, api_keys: ["{key_hash(ACME)}"]}}
          bob: {{plan: credits, api_keys: ["{key_hash(BOB)}"]}}
          rated: {{plan: rated, api_keys: ["{key_hash(RATED)}"]}}
        {extra}
        """,
    )


def event(record_id: str, meter: str = "requests", value: object = None, **fields: Any) -> dict[str, Any]:
    """A CloudEvent as an OpenMeter emitter writes it."""
    body: dict[str, Any] = {
        "specversion": "1.0",
        "id": record_id,
        "source": "jobs",
        "type": meter,
        "subject": "acme",
        "time": datetime.now(UTC).isoformat(),
    }
    if value is not None:
        body["data"] = {"value": value, "region": "eu"}
    return body | fields


async def post(
    client: Client, *events: dict[str, Any], query: str = "", single: bool = False
) -> tuple[int, Any]:
    kind, body = (SINGLE, events[0]) if single else (BATCH, list(events))
    response = await client.post(
        f"/admin/events{query}", data=json.dumps(body), headers={"Content-Type": kind}
    )
    return response.status, await response.json()


def outcomes(answer: dict[str, Any]) -> list[str]:
    return [result["result"] for result in answer["results"]]


async def used(client: Client, customer: str = "acme") -> dict[str, int]:
    response = await client.get(f"/admin/customers/{customer}/usage")
    rows = (await response.json())["limits"]
    return {f"{row['meter']}-{row['period']}": row["used"] for row in rows}


@pytest.fixture
async def admin(sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream) -> Client:
    return await sidecar(policy_file(tmp_path), upstream.url, admin=True)


async def test_a_single_cloudevent_is_counted_in_its_meters_quota(admin: Client) -> None:
    status, answer = await post(admin, event("job-1", "gpu_seconds", 30), single=True)
    assert (status, outcomes(answer)) == (200, ["accepted"])
    assert answer["results"][0] | {"index": 0, "id": "job-1"} == answer["results"][0]
    assert (await used(admin))["gpu_seconds-day"] == 30


async def test_a_batch_answers_every_record_in_order_and_counts_only_the_good_ones(admin: Client) -> None:
    now = time.time()
    old = datetime.fromtimestamp(now - 36 * 86400, UTC).isoformat()
    ahead = datetime.fromtimestamp(now + 600, UTC).isoformat()
    batch = [
        event("a", "gpu_seconds", 10),
        event("a", "gpu_seconds", 10),  # the same source and id: counted once
        event("b", "gpu_seconds", 10, source="other-source"),  # another source: its own record
        event("c", "gpu_seconds", 5, subject="nobody"),
        event("d", "nothing", 5),
        event("e", "gpu_seconds", -5),
        event("f", "gpu_seconds", "lots"),
        event("g", "gpu_seconds", 1.5),
        event("h", "gpu_seconds", 5, time=old),
        event("i", "gpu_seconds", 5, time=ahead),
        event("j", "gpu_seconds", 5, time="yesterday"),
        event("", "gpu_seconds", 5),
        {k: v for k, v in event("k", "gpu_seconds", 5).items() if k != "subject"},
        event("l", "gpu_seconds"),  # a sum meter needs an amount
        event("m", "gpu_seconds", "7"),  # a decimal string, as some emitters send
        event("n"),  # a count meter counts 1
        "not an object",
    ]
    status, answer = await post(admin, *batch)
    assert status == 200
    assert outcomes(answer) == ["accepted", "duplicate", "accepted"] + ["invalid"] * 11 + ["accepted"] * 2 + [
        "invalid"
    ]
    fields = [r.get("field") for r in answer["results"] if r["result"] == "invalid"]
    assert fields == [
        "subject",
        "type",
        "data.value",
        "data.value",
        "data.value",
        "time",
        "time",
        "time",
        "id",
        "subject",
        "data.value",
        "",
    ]
    assert "older than 35 days" in answer["results"][8]["reason"]
    assert "5 minutes ahead" in answer["results"][9]["reason"]
    assert (answer["accepted"], answer["duplicate"], answer["invalid"]) == (4, 1, 12)
    usage = await used(admin)
    assert (usage["gpu_seconds-day"], usage["requests-month"]) == (27, 1)


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        (BATCH, b"[{", 400),
        (BATCH, b'{"specversion": "1.0"}', 400),  # a batch is an array
        (SINGLE, b"[]", 400),  # one record is an object
        (BATCH, b"\xff\xfe", 400),
        ("application/json", b"[]", 415),
        ("text/plain", b"[]", 415),
        (BATCH, json.dumps([{}] * (MAX_RECORDS + 1)).encode(), 413),
        (BATCH, b"[" + b" " * (5 * 1024 * 1024) + b"]", 413),
    ],
)
async def test_a_body_that_cannot_be_taken_is_refused_whole(
    admin: Client, content_type: str, body: bytes, status: int
) -> None:
    response = await admin.post(
        "/admin/events", data=io.BytesIO(body), headers={"Content-Type": content_type}
    )
    assert response.status == status
    assert response.content_type == "application/problem+json"
    assert (await used(admin))["requests-month"] == 0


async def test_the_admin_token_is_required(
    sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream
) -> None:
    client = await sidecar(policy_file(tmp_path), upstream.url, admin=True, admin_token="s3cret")
    body = json.dumps([event("a")])
    response = await client.post("/admin/events", data=body, headers={"Content-Type": BATCH})
    assert response.status == 401
    headers = {"Content-Type": BATCH, "Authorization": "Bearer s3cret"}
    response = await client.post("/admin/events", data=body, headers=headers)
    assert response.status == 200


async def test_an_openmeter_sdk_posts_to_its_own_path_with_the_token(
    sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream
) -> None:
    """What openmeter's Python SDK sends for client.ingest_events(to_dict(CloudEvent(...))) with
    endpoint=<admin port> and headers={"Authorization": "Bearer ..."}: the cloudevents library's
    id (a uuid), time (RFC 3339 with +00:00) and specversion, one event as cloudevents+json."""
    client = await sidecar(policy_file(tmp_path), upstream.url, admin=True, admin_token="s3cret")
    sdk_event = {
        "specversion": "1.0",
        "id": "4b8e9c0a-1f2d-4e5b-9a7c-3d6f8e1b2a90",
        "source": "openmeter-python",
        "type": "gpu_seconds",
        "subject": "acme",
        "time": datetime.now(UTC).isoformat(),
        "data": {"value": 12, "model": "a100"},
    }
    body = json.dumps(sdk_event)
    refused = await client.post(OPENMETER_PATH, data=body, headers={"Content-Type": SINGLE})
    assert refused.status == 401
    headers = {"Content-Type": SINGLE, "Authorization": "Bearer s3cret", "Accept": "application/json"}
    response = await client.post(OPENMETER_PATH, data=body, headers=headers)
    assert response.status == 200
    assert outcomes(await response.json()) == ["accepted"]


async def test_a_record_is_a_fact_counted_past_its_limit_unless_enforced(admin: Client) -> None:
    status, answer = await post(admin, event("big", "gpu_seconds", 150))
    assert (status, outcomes(answer)) == (200, ["accepted"])
    status, answer = await post(admin, event("more", "gpu_seconds", 1, enforce=True))
    assert outcomes(answer) == ["refused"]
    assert answer["results"][0]["violated-policies"] == ["gpu_seconds-day"]
    status, answer = await post(admin, event("more", "gpu_seconds", 1), query="?enforce=true")
    assert outcomes(answer) == ["refused"]
    assert (await used(admin))["gpu_seconds-day"] == 150


async def test_enforce_is_all_or_nothing_per_record(admin: Client) -> None:
    batch = [event(f"r{i}", "requests", 20, enforce=True) for i in range(4)]
    _, answer = await post(admin, *batch)
    assert outcomes(answer) == ["accepted", "accepted", "refused", "refused"]  # 57: 20 + 20, then 17 left
    assert answer["results"][2]["violated-policies"] == ["requests-month"]
    assert (await used(admin))["requests-month"] == 40
    _, answer = await post(admin, event("r2", "requests", 17, enforce=True))
    assert outcomes(answer) == ["accepted"]  # a refused id is not remembered: sent again, it counts
    assert (await used(admin))["requests-month"] == 57


async def test_rate_limits_do_not_take_records(admin: Client) -> None:
    _, answer = await post(admin, event("bulk", "requests", 10, subject="rated"))
    assert outcomes(answer) == ["accepted"]
    usage = await used(admin, "rated")
    assert (usage["requests-minute"], usage["requests-month"]) == (0, 10)


async def test_prepaid_credit_is_drawn_by_records_and_an_enforced_one_needs_it(admin: Client) -> None:
    grant = {"id": "order-1", "meter": "tokens", "amount": 100}
    assert (await admin.post("/admin/customers/bob/grants", json=grant)).status == 201
    _, answer = await post(admin, event("t1", "tokens", 70, subject="bob"))
    assert outcomes(answer) == ["accepted"]
    _, answer = await post(admin, event("t2", "tokens", 40, subject="bob", enforce=True))
    assert (outcomes(answer), answer["results"][0]["violated-policies"]) == (["refused"], ["tokens-prepaid"])
    _, answer = await post(admin, event("t3", "tokens", 40, subject="bob"))  # a fact: overdraws
    assert outcomes(answer) == ["accepted"]
    response = await admin.get("/admin/customers/bob/usage")
    [row] = (await response.json())["limits"]
    assert (row["limit"], row["used"], row["remaining"]) == (100, 110, -10)


async def test_a_max_meter_takes_negative_values(admin: Client) -> None:
    _, answer = await post(admin, event("p1", "peak", -3), event("p2", "peak", 9))
    assert outcomes(answer) == ["accepted", "accepted"]


# -- an event meter gates proxied requests -------------------------------------------------------


async def test_an_event_meter_admits_requests_while_records_leave_it_room(
    sidecar: SidecarFactory, tmp_path: Path, upstream: Upstream
) -> None:
    path = policy_file(tmp_path)
    proxy, admin = await sidecar(path, upstream.url), await sidecar(path, upstream.url, admin=True)
    assert (await proxy.get("/v1/search", headers={"X-API-Key": ACME})).status == 200
    await post(admin, event("used-up", "gpu_seconds", 100))
    refused = await proxy.get("/v1/search", headers={"X-API-Key": ACME})
    assert refused.status == 429
    body = await refused.json()
    assert (body["meter"], body["violated-policies"]) == ("gpu_seconds", ["gpu_seconds-day"])
    assert len(upstream.seen) == 1


# -- two instances on one Redis: records and proxied requests on one quota -----------------------


@dataclass
class Instance:
    proxy: Client
    admin: Client


@pytest.fixture
async def instances(
    aiohttp_client: ClientFactory, redis_url: str, upstream: Upstream, tmp_path: Path
) -> Callable[[Path, int], Awaitable[list[Instance]]]:
    async def make(path: Path, count: int) -> list[Instance]:
        made = []
        for _ in range(count):
            components = make_components(path, upstream.url, redis_url)
            proxy = await loopback_client(
                aiohttp_client, build_proxy_app(components), closing=components.store
            )
            made.append(Instance(proxy, await loopback_client(aiohttp_client, build_admin_app(components))))
        return made

    return make


async def test_two_instances_admit_exactly_the_quota_between_enforced_records_and_requests(
    instances: Callable[[Path, int], Awaitable[list[Instance]]], tmp_path: Path, upstream: Upstream
) -> None:
    pair = await instances(policy_file(tmp_path, quota=57), 2)

    async def request(i: int) -> int:
        response = await pair[i % 2].proxy.get("/v1/search", headers={"X-API-Key": ACME})
        await response.read()
        return 1 if response.status == 200 else 0

    async def records(i: int) -> int:
        batch = [event(f"b{i}-{j}", "requests", enforce=True) for j in range(6)]
        _, answer = await post(pair[i % 2].admin, *batch)
        return outcomes(answer).count("accepted")

    async def single(i: int) -> int:
        _, answer = await post(pair[i % 2].admin, event(f"s{i}", "requests", enforce=True), single=True)
        return outcomes(answer).count("accepted")

    work = [request(i) for i in range(80)] + [records(i) for i in range(10)] + [single(i) for i in range(40)]
    admitted = await asyncio.gather(*work)
    assert sum(admitted) == 57
    assert len(upstream.seen) == sum(admitted[:80])
    assert (await used(pair[0].admin))["requests-month"] == 57


# -- billing: the window of the record's time, amended once pushed --------------------------------


@pytest.fixture
async def pushing(
    aiohttp_client: ClientFactory, redis_url: str, upstream: Upstream, receiver: Receiver, tmp_path: Path
) -> AsyncIterator[tuple[Client, Pusher]]:
    billing = f'billing: {{url: "{receiver.url}", format: json, interval: 1, grace: 0}}'
    components = make_components(policy_file(tmp_path, extra=billing), upstream.url, redis_url)
    admin = await loopback_client(aiohttp_client, build_admin_app(components), closing=components.store)
    async with aiohttp.ClientSession() as session:
        pusher = Pusher(
            holder=components.holder,
            outbox=components.outbox,
            marks=components.marks,
            session=session,
            metrics=components.metrics,
            clock=components.store.time,
            directory=components.directory,
            backoff_base=0.05,
        )
        yield admin, pusher


async def push_until(pusher: Pusher, receiver: Receiver, units: int) -> None:
    deadline = time.monotonic() + 15
    while receiver.units() < units and time.monotonic() < deadline:
        await pusher.cycle()
        await asyncio.sleep(0.05)


async def test_a_late_record_for_a_pushed_window_is_billed_as_an_amended_summary(
    pushing: tuple[Client, Pusher], receiver: Receiver
) -> None:
    admin, pusher = pushing
    at = datetime.fromtimestamp(int(time.time()) - 2, UTC)  # a window that has closed already
    await post(admin, event("first", "gpu_seconds", 5, time=at.isoformat()))
    await push_until(pusher, receiver, 5)
    await post(admin, event("late", "gpu_seconds", 3, time=at.isoformat()))
    await post(admin, event("first", "gpu_seconds", 5, time=at.isoformat()))  # a resend: a duplicate
    await push_until(pusher, receiver, 8)
    summaries = [r.summary for r in receiver.unique().values()]
    assert sorted(s["value"] for s in summaries) == [3, 5]  # type: ignore[type-var]
    assert {s["window_start"] for s in summaries} == {at.strftime("%Y-%m-%dT%H:%M:%SZ")}
    assert {(s["meter"], s["feature"]) for s in summaries} == {("gpu_seconds", "")}
    assert receiver.totals() == {("acme", "gpu_seconds"): 8} and not receiver.conflicting()
