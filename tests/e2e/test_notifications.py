"""Threshold notifications end to end (SPEC §9): two sidecar replicas on one real Redis, traffic
crossing 80% and 100% together, each replica's notifier delivering to a real receiver on loopback.

Exactly one notification per (customer, limit, window, threshold) reaches the receiver, signed
like billing pushes, with a deterministic id; a receiver failing and then recovering gets each
with the same id; a permanent refusal is a dead letter the admin API lists and re-drives; prepaid
credit sends credit.low and credit.exhausted, here as CloudEvents.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.billing.notifier import Notifier
from sidecar.billing.signing import verify
from sidecar.http.app import build_admin_app, build_proxy_app
from sidecar.http.components import Components
from tests.conftest import make_components
from tests.e2e.conftest import Launcher, store_args
from tests.helpers import (
    ACME,
    BILLING_SECRET,
    Client,
    ClientFactory,
    ServerFactory,
    Upstream,
    key_hash,
    loopback_client,
    serve,
    write_policy,
)

DELIVERY_SECONDS = 15.0


@dataclass
class Hooks:
    """The app's webhook: records every POST, answers ``failing`` with 503 (then 200), or
    ``refusing`` with 410 for good."""

    url: str = ""
    failing: int = 0
    refusing: bool = False
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts.append((dict(request.headers), body))
        if self.refusing:
            return web.json_response({"error": "no such hook"}, status=410)
        if len(self.posts) <= self.failing:
            return web.json_response({"error": "down"}, status=503)
        self.accepted.append(json.loads(body))
        return web.json_response({"ok": True})

    def ids(self) -> list[str]:
        return [str(sent["id"]) for sent in self.accepted]

    def by_threshold(self) -> dict[tuple[str, int], dict[str, Any]]:
        data = [sent.get("data", sent) for sent in self.accepted]
        return {(str(d["type"]), int(d["threshold"])): d for d in data}


@pytest.fixture
async def hooks(aiohttp_server: ServerFactory) -> Hooks:
    hooks = Hooks()
    app = web.Application()
    app.router.add_post("/hooks/usage", hooks.handle)
    hooks.url = f"{await serve(aiohttp_server, app)}/hooks/usage"
    return hooks


def notify_policy(
    tmp_path: Path, hooks: Hooks, *, limit: int = 50, extra: str = "", fmt: str = "json"
) -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters: {{requests: {{aggregation: count}}}}
        features: [{{name: search, match: {{path: /v1/search}}}}]
        plans:
          p: {{features: [search], limits: [{{meter: requests, limit: {limit}, period: month}}]}}
          credits: {{features: [search], prepaid: [requests]}}
        customers:
          acme: {{plan: p, api_keys: ["{key_hash(ACME)}"]}}
          bob: {{plan: credits, api_keys: ["{key_hash("bob-key-1")}"]}}
        notifications: {{url: "{hooks.url}", format: {fmt}, thresholds: [80, 100]}}
        {extra}
        """,
    )


@dataclass
class Replica:
    proxy: Client
    admin: Client
    components: Components
    notifier: Notifier


ReplicaFactory = Callable[[Path], Awaitable[Replica]]


@pytest.fixture
async def replica(
    aiohttp_client: ClientFactory, redis_url: str, upstream: Upstream
) -> AsyncIterator[ReplicaFactory]:
    """A sidecar on the test's Redis, its admin app, and a notifier signing with BILLING_SECRET."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(policy: Path) -> Replica:
        components = make_components(policy, upstream.url, redis_url)
        proxy = await loopback_client(aiohttp_client, build_proxy_app(components), closing=components.store)
        admin = await loopback_client(aiohttp_client, build_admin_app(components))
        session = aiohttp.ClientSession()
        sessions.append(session)
        notifier = Notifier(
            holder=components.holder,
            outbox=components.store.notifications,
            session=session,
            metrics=components.metrics,
            clock=components.store.time,
            secret=BILLING_SECRET,
            backoff_base=0.05,
        )
        return Replica(proxy, admin, components, notifier)

    yield make
    for session in sessions:
        await session.close()


async def search(replicas: list[Replica], count: int, key: str = ACME) -> list[int]:
    async def one(index: int) -> int:
        response = await replicas[index % len(replicas)].proxy.get("/v1/search", headers={"X-API-Key": key})
        await response.read()
        return response.status

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def deliver(replicas: list[Replica], done: Callable[[], bool]) -> None:
    """Every replica's notifier cycles at once until ``done``, or the test gives up."""
    deadline = time.monotonic() + DELIVERY_SECONDS
    while not done() and time.monotonic() < deadline:
        await asyncio.gather(*(r.notifier.cycle() for r in replicas))
        await asyncio.sleep(0.05)


async def test_two_replicas_crossing_80_and_100_together_notify_each_threshold_once(
    tmp_path: Path, hooks: Hooks, replica: ReplicaFactory
) -> None:
    policy = notify_policy(tmp_path, hooks)
    replicas = [await replica(policy), await replica(policy)]
    statuses = await search(replicas, 160)  # 160 at once over both: 80% and 100% crossed together
    assert statuses.count(200) == 50 and statuses.count(429) == 110
    await deliver(replicas, lambda: len(hooks.accepted) >= 2)
    await asyncio.sleep(0.3)
    await asyncio.gather(*(r.notifier.cycle() for r in replicas))  # nothing more comes
    assert len(hooks.posts) == 2 and len(set(hooks.ids())) == 2
    sent = hooks.by_threshold()
    eighty, full = sent[("limit.threshold", 80)], sent[("limit.threshold", 100)]
    assert (eighty["used"], eighty["limit"], full["used"], full["limit"]) == (40, 50, 50, 50)
    assert {k: eighty[k] for k in ("customer", "plan", "limit_name", "meter", "period", "feature")} == {
        "customer": "acme",
        "plan": "p",
        "limit_name": "requests-month",
        "meter": "requests",
        "period": "month",
        "feature": None,
    }
    assert eighty["window_start"].endswith("T00:00:00Z") and eighty["window_end"] > eighty["window_start"]
    for headers, body in hooks.posts:
        assert verify(BILLING_SECRET, headers["Sidecar-Signature"], body)
        assert headers["Idempotency-Key"] == json.loads(body)["id"]
        assert headers["Content-Type"] == "application/json"


async def test_a_receiver_failing_then_recovering_gets_each_notification_with_the_same_id(
    tmp_path: Path, hooks: Hooks, replica: ReplicaFactory
) -> None:
    hooks.failing = 3
    replicas = [
        await replica(notify_policy(tmp_path, hooks, limit=5)),
        await replica(notify_policy(tmp_path, hooks, limit=5)),
    ]
    await search(replicas, 5)
    await deliver(replicas, lambda: len(hooks.accepted) >= 2)
    assert len(hooks.posts) == 5 and len(hooks.accepted) == 2
    ids = [json.loads(body)["id"] for _, body in hooks.posts]
    assert set(ids) == set(hooks.ids()) and len(set(ids)) == 2  # retried with the same ids
    assert ids[:3] == [ids[0]] * 3  # the oldest first, again and again until it went through
    assert await replicas[0].components.store.notifications.waiting() == 0
    metrics = replicas[0].components.metrics.exposition() + replicas[1].components.metrics.exposition()
    assert b'sidecar_notifications_total{outcome="retry"}' in metrics


async def test_a_refused_notification_is_a_dead_letter_and_a_redrive_sends_it_again(
    tmp_path: Path, hooks: Hooks, replica: ReplicaFactory
) -> None:
    hooks.refusing = True
    one = await replica(notify_policy(tmp_path, hooks, limit=1))
    await search([one], 1)
    await deliver([one], lambda: len(hooks.posts) >= 2)
    listed = await (await one.admin.get("/admin/notifications/dead-letters")).json()
    letters = listed["dead_letters"]
    assert sorted(letter["notification"]["threshold"] for letter in letters) == [80, 100]
    assert all(letter["reason"].startswith("HTTP 410") for letter in letters)
    assert (await (await one.admin.get("/admin/notifications")).json())["dead_letters"] == 2
    hooks.refusing = False
    redriven = await (await one.admin.post("/admin/notifications/dead-letters/redrive")).json()
    assert redriven == {"redriven": 2}
    await deliver([one], lambda: len(hooks.accepted) >= 2)
    assert sorted(hooks.ids()) == sorted(letter["notification"]["id"] for letter in letters)
    recent = await (await one.admin.get("/admin/customers/acme/notifications")).json()
    assert [n["threshold"] for n in recent["notifications"]] == [100, 80]


async def test_prepaid_credit_sends_credit_low_and_exhausted_as_cloudevents(
    tmp_path: Path, hooks: Hooks, replica: ReplicaFactory
) -> None:
    one = await replica(notify_policy(tmp_path, hooks, fmt="cloudevents"))
    granted = await one.admin.post(
        "/admin/customers/bob/grants", json={"id": "pack-1", "meter": "requests", "amount": 10}
    )
    assert granted.status == 201
    statuses = await search([one], 12, key="bob-key-1")
    assert statuses.count(200) == 10
    await deliver([one], lambda: len(hooks.accepted) >= 2)
    sent = hooks.by_threshold()
    assert set(sent) == {("credit.low", 80), ("credit.exhausted", 100)}
    low = sent[("credit.low", 80)]
    assert (low["limit_name"], low["period"], low["used"], low["limit"], low["window_start"]) == (
        "requests-prepaid", "prepaid", 8, 10, None,
    )  # fmt: skip
    event = hooks.accepted[0]
    assert (event["specversion"], event["source"], event["subject"]) == ("1.0", "quota-sidecar", "bob")
    assert event["id"] == event["data"]["id"] and event["type"] == event["data"]["type"]
    assert all(h["Content-Type"] == "application/cloudevents+json" for h, _ in hooks.posts)


async def test_a_policy_without_notifications_records_none(
    tmp_path: Path, hooks: Hooks, replica: ReplicaFactory, upstream: Upstream
) -> None:
    text = notify_policy(tmp_path, hooks, limit=2).read_text()
    plain = write_policy(
        tmp_path, "\n".join(line for line in text.splitlines() if "notifications" not in line), "plain.yaml"
    )
    one = await replica(plain)
    await search([one], 3)
    await one.notifier.cycle()
    assert await one.components.store.notifications.pending("acme") == [] and hooks.posts == []


async def test_sidecar_run_delivers_notifications_from_two_processes_once_each(
    tmp_path: Path, hooks: Hooks, upstream: Upstream, redis_url: str, launch: Launcher
) -> None:
    """The notifier runs beside the pusher in `sidecar run` (runtime/server.py), signing with
    SIDECAR_BILLING_SECRET."""
    policy = notify_policy(tmp_path, hooks, limit=10)
    env = {"SIDECAR_BILLING_SECRET": BILLING_SECRET}
    sidecars = [
        await launch(policy, upstream.url, tmp_path / f"data-{n}", *store_args(redis_url), env=env)
        for n in range(2)
    ]
    async with aiohttp.ClientSession() as session:
        for sidecar in sidecars:
            await sidecar.wait_ready(session)

        async def one(index: int) -> int:
            url = f"{sidecars[index % 2].proxy}/v1/search"
            async with session.get(url, headers={"X-API-Key": ACME}) as response:
                return response.status

        statuses = await asyncio.gather(*(one(i) for i in range(30)))
    assert statuses.count(200) == 10
    deadline = time.monotonic() + DELIVERY_SECONDS
    while len(hooks.accepted) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # a second notifier cycle on each: nothing more comes
    assert sorted(hooks.by_threshold()) == [("limit.threshold", 80), ("limit.threshold", 100)]
    assert len(hooks.posts) == 2
    assert all(verify(BILLING_SECRET, headers["Sidecar-Signature"], body) for headers, body in hooks.posts)


async def test_usage_records_notify_like_proxied_requests_and_together_once(
    tmp_path: Path, hooks: Hooks, replica: ReplicaFactory
) -> None:
    """POST /admin/events records (SPEC §8) count like proxied usage, so they cross thresholds
    too: records and requests through two replicas at once take acme's 10 across 80% and 100%,
    and each crossing is sent once."""
    policy = notify_policy(tmp_path, hooks, limit=10)
    replicas = [await replica(policy), await replica(policy)]
    envelope = {"specversion": "1.0", "source": "jobs", "type": "requests", "subject": "acme"}
    now = datetime.now(UTC).isoformat()
    batches = [[{**envelope, "id": f"r{n}-{i}", "time": now} for i in range(3)] for n in range(2)]
    posted = [
        r.admin.post(
            "/admin/events", json=batch, headers={"Content-Type": "application/cloudevents-batch+json"}
        )
        for r, batch in zip(replicas, batches, strict=True)
    ]
    answers = await asyncio.gather(*posted, search(replicas, 8))
    assert [a.status for a in answers[:2]] == [200, 200]
    await deliver(replicas, lambda: len(hooks.accepted) >= 2)
    await asyncio.gather(*(r.notifier.cycle() for r in replicas))
    assert sorted(hooks.by_threshold()) == [("limit.threshold", 80), ("limit.threshold", 100)]
    assert len(hooks.posts) == 2
